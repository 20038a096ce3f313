"""Bradley-Terry reward-model loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | float = 0.0,
                       center_coef: float = 0.0) -> torch.Tensor:
    """Per-pair loss -log sigmoid(r_c - r_r - m) + c (r_c + r_r)^2.

    chosen, rejected (B,) scalar rewards; margin (B,) or scalar (Llama-2 style, 0 = plain BT);
    center_coef c > 0 adds Eisenstein et al.'s centering term that keeps rewards near 0.
    """
    losses = -F.logsigmoid(chosen - rejected - margin)
    if center_coef:
        losses = losses + center_coef * (chosen + rejected) ** 2
    return losses
