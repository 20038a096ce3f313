"""A linear layer that holds its base weight once and adds one of several one-bit deltas.

y = x W_base^T + b + α_k (x S_k^T) for the active delta k (none active: the base layer). The signs
stay packed (1 bit per weight) and are unpacked one layer at a time inside the matmul, so serving
many fine-tunes over one base costs 1/32 of a fp32 copy per fine-tune, and scale distillation costs
no extra dense weight copy.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from .pack import unpack_signs


class SignMatmul(torch.autograd.Function):
    """α · (x S^T) with S = ±1 unpacked from bits, differentiable in x and α.

    The reference repo's kernel had no backward, so gradients reached the layer input only through
    x W_base^T and upstream scales ignored every downstream delta (its bug #2); here
    dL/dx = α (g S) and dL/dα = sum(g ⊙ x S^T).
    """

    @staticmethod
    def forward(ctx, x, packed, shape, alpha):
        xs = nn.functional.linear(x, unpack_signs(packed, shape, x.dtype))
        ctx.save_for_backward(packed, alpha, xs if ctx.needs_input_grad[3] else None)
        ctx.shape = shape
        return xs * alpha.to(xs.dtype)

    @staticmethod
    def backward(ctx, grad):
        packed, alpha, xs = ctx.saved_tensors
        grad_x = grad_alpha = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ unpack_signs(packed, ctx.shape, grad.dtype)) * alpha.to(grad.dtype)
        if ctx.needs_input_grad[3]:
            grad_alpha = (grad.float() * xs.float()).sum().reshape(alpha.shape).to(alpha.dtype)
        return grad_x, None, None, grad_alpha


def sign_matmul(x: torch.Tensor, packed: torch.Tensor, shape, alpha: torch.Tensor) -> torch.Tensor:
    """x (..., in) -> α · x S^T (..., out); S = unpack_signs(packed, shape) has shape (out, in)."""
    return SignMatmul.apply(x, packed, tuple(shape), alpha)


class BitDeltaLinear(nn.Module):
    """Wraps an nn.Linear (kept as `.base`, frozen by the caller) with named one-bit deltas."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        self.shape = tuple(base.weight.shape)
        self.scales = nn.ParameterDict()
        self.active: str | None = None

    def add_delta(self, name: str, packed: torch.Tensor, scale: torch.Tensor, trainable: bool = False) -> None:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueError(f"delta name {name!r}: use letters, digits and _ only")
        device = self.base.weight.device
        self.register_buffer(f"signs_{name}", packed.to(device), persistent=False)
        self.scales[name] = nn.Parameter(scale.detach().float().reshape(()).to(device), requires_grad=trainable)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.active is None:
            return y
        packed = getattr(self, f"signs_{self.active}")
        return y + sign_matmul(x, packed, self.shape, self.scales[self.active]).to(y.dtype)


def wrap_linears(model: nn.Module, names) -> dict[str, BitDeltaLinear]:
    """Replace each named nn.Linear of model by a BitDeltaLinear around it (idempotent)."""
    wrapped = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        module = getattr(parent, child)
        if not isinstance(module, BitDeltaLinear):
            module = BitDeltaLinear(module)
            setattr(parent, child, module)
        wrapped[name] = module
    return wrapped


def unwrap_linears(model: nn.Module) -> None:
    """Put the plain base nn.Linear back wherever a BitDeltaLinear is."""
    for name, module in list(model.named_modules()):
        if isinstance(module, BitDeltaLinear):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.base)


def base_named_parameters(model: nn.Module):
    """(name, parameter) of model's own weights under their unwrapped names: a BitDeltaLinear's
    `.base` hop removed and its scales left out, so wrapping changes neither names nor the set."""
    wrapped = {n for n, m in model.named_modules() if isinstance(m, BitDeltaLinear)}
    for name, p in model.named_parameters():
        parts = name.split(".")
        for i in range(1, len(parts)):
            if ".".join(parts[:i]) in wrapped:
                if parts[i] == "scales":
                    break
                name = ".".join(parts[:i] + parts[i + 1:])
        else:
            yield name, p
