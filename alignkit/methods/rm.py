"""Reward model: Bradley-Terry loss on the score of the last real token of each answer."""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from omegaconf import MISSING

from ..data.tokenize import encode_rows
from ..errors import require
from .record import Method


@dataclass
class RMMethod:
    name: str = MISSING
    margin: float = MISSING
    center_coef: float = MISSING


def rm_step(model, batch: dict, denominator: int, method):
    from ..forward.scores import last_token_scores
    from ..objectives import bradley_terry_loss

    n = batch["count"]
    scores = last_token_scores(model, batch)
    chosen, rejected = scores[:n], scores[n:]
    margin = batch["margin"] * method.margin if "margin" in batch else 0.0
    losses = bradley_terry_loss(chosen, rejected, margin, method.center_coef)
    stats = {
        "accuracy": (chosen > rejected).float().sum(),  # strict, as TRL
        "margin": (chosen - rejected).detach().sum(),
        "rewards/chosen": chosen.detach().sum(),
        "rewards/rejected": rejected.detach().sum(),
    }
    return losses.sum() / denominator, stats


def prepare(cfg, tokenizer, rows):
    from ..data.collate import collate_preference

    return encode_rows(tokenizer, rows, cfg.data, "preference"), partial(collate_preference,
                                                                         pad_id=tokenizer.pad_token_id)


def check(cfg) -> None:
    require(cfg.method.center_coef >= 0, "method.center_coef", cfg.method.center_coef, "must be >= 0")


METHOD = Method("rm", RMMethod, data="preference", head="score",
                adapters=("prompt", "prefix", "lora", "qlora", "full", "vera", "loha", "lokr", "ia3"),
                metrics=("loss", "accuracy", "margin"),
                prepare=prepare, step=rm_step, reference=lambda m: False, check=check)
