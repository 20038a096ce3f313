"""Scale distillation: train only the α's so the compressed model's logits match the fine-tuned one's.

Memory: the fine-tuned model (the teacher) stays loaded and its logits are computed batch by batch
under no_grad, right before the student's forward; nothing is cached. Peak = base weights (the
student, whose linears hold W_base plus 1-bit signs) + one fine-tuned copy + one batch's activations,
whatever distill_steps and the vocabulary size are. (Caching teacher logits instead would free the
teacher but costs steps x batch x length x vocab floats: 20 GB for the paper's 200 x 4 x 128 x 49k.)

The step size is relative: each α gets its own Adam learning rate lr * α_initial, so one setting
works whether the fine-tune moved weights by 1e-2 or 1e-5 (Adam steps are about lr in size).
"""
from __future__ import annotations

import itertools
from typing import Iterator

import torch
from transformers import get_scheduler

from ..session.batches import micro_batches
from ..session.progress import progress_bar
from .fidelity import batches, logits, masked_kl, masked_logit_mse

LOSSES = {"kl": masked_kl, "mse": masked_logit_mse}


def calibration_stream(seqs: list[dict], batch_size: int, pad_id: int, seed: int) -> Iterator[dict]:
    """Endless batches over the calibration sequences, reshuffled (seeded) every pass."""
    for epoch in itertools.count():
        for chunk in micro_batches(seqs, batch_size, seed, epoch):
            yield from batches(chunk, batch_size, pad_id)


def distill_scales(teacher, student, stream: Iterator[dict], steps: int, lr: float, loss: str, device,
                   precision: str) -> list[float]:
    """Adam on the student's trainable parameters (its scales only), cosine decay; returns the loss
    of each step (measured before that step's update)."""
    scales = [p for p in student.parameters() if p.requires_grad]
    if any(p.dim() != 0 for p in scales):
        raise ValueError("distill_scales: only the 0-dim scales may be trainable")
    groups = [{"params": [p], "lr": lr * float(p.detach().abs())} for p in scales]
    optimizer = torch.optim.Adam(groups, lr=lr)
    schedule = get_scheduler("cosine", optimizer, num_warmup_steps=0, num_training_steps=max(steps, 1))
    loss_fn = LOSSES[loss]
    teacher.eval()
    student.eval()  # no dropout: the student must see what the teacher sees
    history = []
    with progress_bar(steps, 0, "distil scales") as bar:
        for batch in itertools.islice(stream, steps):
            with torch.no_grad():
                target = logits(teacher, batch, device, precision)
            mask = batch["attention_mask"].to(device).float()
            value = loss_fn(target, logits(student, batch, device, precision), mask)
            value.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            history.append(float(value.detach()))
            bar.update(len(history), history[-1])
    return history
