"""DPO family losses on summed sequence log-probs."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sigmoid DPO, conservative (cDPO) when label_smoothing = eps > 0.

    Inputs (B,): summed completion log-probs. With h = (pc - rc) - (pr - rr):
    loss = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h), per pair.
    Returns (losses (B,), chosen_rewards (B,), rejected_rewards (B,)), rewards = beta * log-ratio, detached.
    """
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    h = chosen_ratio - rejected_ratio
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
