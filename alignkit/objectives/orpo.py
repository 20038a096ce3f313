"""ORPO (Hong et al. 2024): the NLL of the chosen answer plus lambda times an odds-ratio term, no reference.

The odds-ratio term works on average per-token log-probs l (<= 0): log odds(y) = l - log(1 - e^l).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x <= 0, accurate on both sides of -log 2 (Maechler 2012)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def odds_ratio_loss(chosen_avg: torch.Tensor, rejected_avg: torch.Tensor, beta: float):
    """Per-pair odds-ratio losses -beta log sigmoid(log odds(y_w) - log odds(y_l)) (B,), and, detached, the
    log odds ratio log odds(y_w) - log odds(y_l) (B,) and its log sigmoid (B,).

    chosen_avg, rejected_avg: average completion log-probs (B,), float32 or wider."""
    log_odds = (chosen_avg - rejected_avg) - (log1mexp(chosen_avg) - log1mexp(rejected_avg))
    ratio = F.logsigmoid(log_odds)
    return -beta * ratio, log_odds.detach(), ratio.detach()
