"""Reward-model stage: Bradley-Terry loss on the score of the last real token."""
from __future__ import annotations

from functools import partial

from ..data.collate import collate_preference
from ..data.tokenize import encode_rows
from ..objectives import bradley_terry_loss
from .common import last_token_scores


def rm_step(model, batch: dict, denominator: int, margin_scale: float, center_coef: float):
    n = batch["count"]
    scores = last_token_scores(model, batch)
    chosen, rejected = scores[:n], scores[n:]
    margin = batch["margin"] * margin_scale if "margin" in batch else 0.0
    losses = bradley_terry_loss(chosen, rejected, margin, center_coef)
    stats = {
        "accuracy": (chosen > rejected).float().sum(),  # strict, as TRL
        "margin": (chosen - rejected).detach().sum(),
        "rewards/chosen": chosen.detach().sum(),
        "rewards/rejected": rejected.detach().sum(),
    }
    return losses.sum() / denominator, stats


def prepare(cfg, tokenizer, rows):
    examples = encode_rows(tokenizer, rows, cfg.data, "preference")
    step = partial(rm_step, margin_scale=cfg.method.margin, center_coef=cfg.method.center_coef)
    return examples, partial(collate_preference, pad_id=tokenizer.pad_token_id), step
