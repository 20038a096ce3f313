"""DPO-family losses on summed (or length-averaged) sequence log-probs.

Every function takes per-pair tensors (B,) and returns
(losses (B,), chosen_rewards (B,), rejected_rewards (B,)), the rewards detached.
Logged rewards are beta * (policy - reference) summed log-ratios for the
reference-based losses (as TRL logs them, also for IPO), and beta * mean
log-prob for SimPO, which has no reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _ratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected):
    return policy_chosen - ref_chosen, policy_rejected - ref_rejected


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float, label_smoothing: float = 0.0):
    """Sigmoid DPO; conservative DPO (cDPO) when label_smoothing = eps > 0.

    h = (pc - rc) - (pr - rr);  loss = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h).
    """
    chosen_ratio, rejected_ratio = _ratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    h = chosen_ratio - rejected_ratio
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def ipo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_tokens, rejected_tokens,
             beta: float):
    """IPO (Azar et al. 2023) with per-token log-ratios, as TRL: (h_avg - 1/(2 beta))^2.

    h_avg = (pc - rc)/|y_w| - (pr - rr)/|y_l|; token counts clamped to >= 1.
    """
    chosen_ratio, rejected_ratio = _ratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    h = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
    losses = (h - 1 / (2 * beta)) ** 2
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def hinge_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float):
    """SLiC-HF hinge: max(0, 1 - beta h)."""
    chosen_ratio, rejected_ratio = _ratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    losses = torch.relu(1 - beta * (chosen_ratio - rejected_ratio))
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def simpo_loss(policy_chosen, policy_rejected, chosen_tokens, rejected_tokens, beta: float, gamma: float):
    """SimPO (Meng et al. 2024), reference-free: -log sigmoid(r_w - r_l - gamma), r = beta * logp / |y|."""
    chosen_r = beta * policy_chosen / chosen_tokens.clamp(min=1)
    rejected_r = beta * policy_rejected / rejected_tokens.clamp(min=1)
    losses = -F.logsigmoid(chosen_r - rejected_r - gamma)
    return losses, chosen_r.detach(), rejected_r.detach()
