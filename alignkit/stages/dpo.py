"""DPO stage: preference loss on policy vs reference log-ratios.

The reference is the same model with its adapters disabled. With no adapter
to disable (adapter=full) the reference log-probs are computed once, before
the first step, and stored with the examples.
"""
from __future__ import annotations

from functools import partial

import torch

from ..data.collate import collate_preference
from ..data.tokenize import encode_rows
from ..objectives import dpo_loss
from .common import sequence_logps


def reference_logps(model, batch: dict) -> torch.Tensor:
    if "ref_chosen" in batch:
        return torch.cat([batch["ref_chosen"], batch["ref_rejected"]])
    with torch.no_grad(), model.disable_adapter():
        return sequence_logps(model, batch)


def dpo_step(model, batch: dict, denominator: int, beta: float, label_smoothing: float):
    n = batch["count"]
    policy = sequence_logps(model, batch)
    ref = reference_logps(model, batch)
    losses, chosen_r, rejected_r = dpo_loss(policy[:n], policy[n:], ref[:n], ref[n:], beta, label_smoothing)
    stats = {
        "rewards/chosen": chosen_r.sum(),
        "rewards/rejected": rejected_r.sum(),
        "rewards/accuracies": (chosen_r > rejected_r).float().sum(),  # strict, as TRL
        "rewards/margins": (chosen_r - rejected_r).sum(),
        "logps/chosen": policy[:n].detach().sum(),
        "logps/rejected": policy[n:].detach().sum(),
    }
    return losses.sum() / denominator, stats


def precompute_reference(model, examples: list, collate, batch_size: int, device) -> None:
    """Store ref_chosen / ref_rejected in each example from the model as it is now."""
    model.eval()
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            chunk = examples[i:i + batch_size]
            batch = collate(chunk)
            lp = sequence_logps(model, {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()})
            for j, e in enumerate(chunk):
                e["ref_chosen"], e["ref_rejected"] = float(lp[j]), float(lp[len(chunk) + j])


def prepare(cfg, tokenizer, rows):
    examples = encode_rows(tokenizer, rows, cfg.data, "preference")
    step = partial(dpo_step, beta=cfg.method.beta, label_smoothing=cfg.method.label_smoothing)
    return examples, partial(collate_preference, pad_id=tokenizer.pad_token_id), step
