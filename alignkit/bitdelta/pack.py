"""One-bit weight deltas: sign bits packed 8 per byte and one scale per matrix. Pure functions.

Sign convention (the paper's): bit 1 means Δ > 0 -> +1, bit 0 means Δ <= 0 -> -1, so Δ = 0 maps to -1
(the reference code maps it to +1; either is fine as long as packing and unpacking agree).
Layout: the matrix is flattened row-major and element 8j+i is bit i of byte j (least significant bit
first, numpy's bitorder="little"); the last byte is zero-padded, so any shape packs, odd sizes included.
"""
from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F


def pack_signs(delta: torch.Tensor) -> torch.Tensor:
    """delta of any shape -> uint8 (ceil(numel / 8),): bit set where delta > 0."""
    bits = (delta.reshape(-1) > 0).to(torch.uint8)
    bits = F.pad(bits, (0, -bits.numel() % 8)).view(-1, 8)
    weights = (1 << torch.arange(8, device=bits.device)).to(torch.uint8)
    return (bits * weights).sum(-1, dtype=torch.uint8)  # distinct powers of two: the sum is a bitwise or


@lru_cache(maxsize=None)
def _sign_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(256, 8): row b holds the ±1 signs of the 8 bits of byte b, least significant first."""
    bits = (torch.arange(256)[:, None] >> torch.arange(8)) & 1
    return (bits * 2 - 1).to(dtype=dtype, device=device)


def unpack_signs(packed: torch.Tensor, shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 packed bits -> ±1 tensor of `shape` in `dtype` (a table lookup, one byte -> 8 signs)."""
    numel = 1
    for size in shape:
        numel *= size
    if packed.numel() != -(-numel // 8):
        raise ValueError(f"{packed.numel()} bytes do not hold the signs of shape {tuple(shape)}")
    signs = F.embedding(packed.to(torch.int32), _sign_table(dtype, packed.device))
    return signs.reshape(-1)[:numel].reshape(shape)


def initial_scale(delta: torch.Tensor) -> torch.Tensor:
    """α = mean |Δ| (fp32 scalar): the scale that minimises ||Δ - α·sign(Δ)||² for fixed signs."""
    return delta.float().abs().mean()


def reconstruct(packed: torch.Tensor, shape, scale: torch.Tensor, dtype: torch.dtype = torch.float32):
    """α·sign(Δ) as a dense matrix."""
    return scale.to(dtype) * unpack_signs(packed, shape, dtype)
