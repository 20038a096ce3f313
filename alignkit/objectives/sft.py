"""Supervised fine-tuning loss."""
from __future__ import annotations

import torch


def sft_loss(token_logps: torch.Tensor, mask: torch.Tensor, num_tokens: int | None = None) -> torch.Tensor:
    """Mean negative log-likelihood over masked tokens.

    token_logps, mask: (B, T). num_tokens: the denominator; pass the token count of the
    whole accumulated batch so that k micro-batches sum to the loss of one big batch.
    """
    total = -(token_logps * mask).sum()
    return total / (mask.sum() if num_tokens is None else num_tokens)
