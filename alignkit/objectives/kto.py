"""KTO (Ethayarajh et al. 2024) on summed completion log-probs of unpaired rows.

A row is desirable (label true) or undesirable (label false); rho = policy - reference summed log-probs.
The reference point z is the KL of policy to reference estimated on mismatched prompt/completion pairs
(x_i, y_j), j != i, clamped at 0 and detached (no gradient flows through it).
"""
from __future__ import annotations

import torch


def kl_point(log_ratio_sum: float, pairs: float) -> float:
    """z = max(0, mean log-ratio of the mismatched pairs): their summed log-ratio over their count (0 if none)."""
    return max(log_ratio_sum / pairs, 0.0) if pairs else 0.0


def kto_loss(policy: torch.Tensor, reference: torch.Tensor, desirable: torch.Tensor, kl: float, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0, loss_type: str = "kto"):
    """Per-row weighted losses (B,) and rewards beta * rho (B,, detached).

    kto: desirable 1 - sigmoid(beta (rho - z)), undesirable 1 - sigmoid(beta (z - rho)) (paper Eq. 7).
    apo_zero_unpaired (D'Oosterlinck et al. 2024): z dropped; desirable 1 - sigmoid(beta rho), undesirable
    sigmoid(beta rho). Desirable rows are weighted by desirable_weight, undesirable ones by undesirable_weight.
    """
    rho = policy - reference
    z = kl if loss_type == "kto" else 0.0
    good = 1 - torch.sigmoid(beta * (rho - z))
    bad = 1 - torch.sigmoid(beta * (z - rho))
    losses = torch.where(desirable, desirable_weight * good, undesirable_weight * bad)
    return losses, beta * rho.detach()
