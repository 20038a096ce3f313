"""How close a compressed model is to the fine-tuned one: KL, next-token agreement, gold score.

Per-token numbers are over every real (non-padding) position of the held-out sequences, prompt
and completion alike: KL(fine-tuned || compressed) of the next-token distributions, and whether
the two models' greedy next tokens (argmax) agree.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.collate import pad_batch
from ..forward.precision import autocast
from ..generation.sample import generate


def sequences(examples: list[dict]) -> list[dict]:
    """Token sequences of encoded examples: SFT rows as they are, preference pairs as both sides."""
    out = []
    for e in examples:
        out.extend([e["chosen"], e["rejected"]] if "chosen" in e else [e])
    return out


def batches(seqs: list[dict], batch_size: int, pad_id: int) -> list[dict]:
    """Right-padded {input_ids, attention_mask} batches of batch_size sequences, in order."""
    return [{k: v for k, v in pad_batch(seqs[i:i + batch_size], pad_id).items() if k != "completion_mask"}
            for i in range(0, len(seqs), batch_size)]


def masked_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over positions where mask (B, T) is 1 of KL(softmax(teacher) || softmax(student)); logits (B, T, V)."""
    t = F.log_softmax(teacher_logits.float(), -1)
    s = F.log_softmax(student_logits.float(), -1)
    kl = (t.exp() * (t - s)).sum(-1)
    return (kl * mask).sum() / mask.sum()


def masked_logit_mse(teacher_logits: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor):
    """The paper's distillation loss: squared logit difference, mean over masked positions x vocabulary."""
    se = (teacher_logits.float() - student_logits.float()).pow(2).mean(-1)
    return (se * mask).sum() / mask.sum()


def logits(model, batch: dict, device, precision: str) -> torch.Tensor:
    with autocast(precision, device):
        out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
    return out.logits.float()


@torch.no_grad()
def fidelity(teacher, model, eval_batches: list[dict], device, precision: str) -> dict:
    """{"kl": mean KL(teacher || model) per token, "agreement": argmax match rate, "tokens": count}."""
    teacher.eval()
    model.eval()
    kl_sum, agree, tokens = 0.0, 0.0, 0.0
    for batch in eval_batches:
        mask = batch["attention_mask"].to(device).float()
        t, s = logits(teacher, batch, device, precision), logits(model, batch, device, precision)
        n = float(mask.sum())
        kl_sum += float(masked_kl(t, s, mask)) * n
        agree += float(((t.argmax(-1) == s.argmax(-1)).float() * mask).sum())
        tokens += n
    return {"kl": kl_sum / max(tokens, 1), "agreement": agree / max(tokens, 1), "tokens": int(tokens)}


def gold_score(model, tokenizer, rows: list[dict], judge, sample, device) -> float:
    """Mean gold-judge score of completions of the rows' prompts (a built-in task's judge), sampled as the
    `sample` section says (greedy by default)."""
    model.eval()
    completions = generate(model, tokenizer, [r["prompt"] for r in rows], sample, device)
    return sum(judge(c, r["answer"]) for c, r in zip(completions, rows)) / max(len(rows), 1)
