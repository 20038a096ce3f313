"""Mixed precision: the autocast context every forward pass runs under."""
from __future__ import annotations

import contextlib

import torch


def resolved_precision(precision: str, device: torch.device) -> str:
    """`auto`: bf16 on a GPU that has it, fp32 otherwise; any other value as it is."""
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def autocast(precision: str, device: torch.device):
    """Mixed precision context for train.precision (auto | fp32 | bf16 | fp16)."""
    precision = resolved_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
