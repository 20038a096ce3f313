"""Plain LoRA linears as one autograd op: y = x Wᵀ + b + s·(x Aᵀ) Bᵀ.

peft adds the adapter term with three more passes over the output (B's product, the scaling, the sum) and
autograd's frozen product saves W. Here the adapter product accumulates into the frozen one in place, the
frozen W is held by reference (nothing saved for it), and the backward is four products with the scaling on
the rank-sized side.

Under activation checkpointing the last adapted linear of each checkpointed layer runs in the other order:
its adapter term first (saving x and x Aᵀ), then the frozen product, which saves nothing. Non-reentrant
checkpointing stops recomputing once every saved tensor is back, so the backward no longer recomputes the
layer's last frozen product (a Llama layer's down projection: a quarter of its linear FLOPs).

Everything else takes peft's own forward: dropout, DoRA and the other variants, a merged or disabled
adapter, several active adapters, a lora_B bias, inputs and weights of different dtypes, 4-bit bases.
"""
from __future__ import annotations

import types

import torch
from torch import nn


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _adapter_grads(ctx, g: torch.Tensor):
    """(grad of the adapter's input through A, grad A, grad B) for the output gradient g (rows, out)."""
    flat, u, a, b = ctx.saved_tensors
    gu = (g @ b).mul_(ctx.scale)
    return gu, gu.t() @ flat, (g.t() @ u).mul_(ctx.scale), a


class _Fused(torch.autograd.Function):
    """x Wᵀ + b + s (x Aᵀ) Bᵀ; W and b frozen."""

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, scale):
        flat = _flat(x)
        u = flat @ a.t()
        y = nn.functional.linear(flat, weight, bias).addmm_(u, b.t(), alpha=scale)
        ctx.save_for_backward(flat, u, a, b)
        ctx.weight, ctx.scale, ctx.shape = weight, scale, x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        g = _flat(grad)
        gu, ga, gb, a = _adapter_grads(ctx, g)
        gx = (g @ ctx.weight).addmm_(gu, a).view(ctx.shape) if ctx.needs_input_grad[0] else None
        return gx, None, None, ga, gb, None


class _Delta(torch.autograd.Function):
    """The adapter term alone: s (x Aᵀ) Bᵀ."""

    @staticmethod
    def forward(ctx, x, a, b, scale):
        flat = _flat(x)
        u = flat @ a.t()
        ctx.save_for_backward(flat, u, a, b)
        ctx.scale, ctx.shape = scale, x.shape
        return (u @ b.t()).mul_(scale).view(*x.shape[:-1], b.shape[0])

    @staticmethod
    def backward(ctx, grad):
        gu, ga, gb, a = _adapter_grads(ctx, _flat(grad))
        return (gu @ a).view(ctx.shape) if ctx.needs_input_grad[0] else None, ga, gb, None


class _FrozenPlus(torch.autograd.Function):
    """x Wᵀ + b + delta with W and b frozen, saving nothing (W is held by reference)."""

    @staticmethod
    def forward(ctx, x, weight, bias, delta):
        y = torch.addmm(_flat(delta), _flat(x), weight.t())
        if bias is not None:
            y.add_(bias)
        ctx.weight, ctx.shape = weight, x.shape
        return y.view(delta.shape)

    @staticmethod
    def backward(ctx, grad):
        gx = (_flat(grad) @ ctx.weight).view(ctx.shape) if ctx.needs_input_grad[0] else None
        return gx, None, None, grad


def _plain(module) -> str | None:
    """The active adapter's name when this call can take the fused path, else None."""
    if module.disable_adapters or module.merged or len(module.active_adapters) != 1:
        return None
    name = module.active_adapters[0]
    base = module.base_layer
    if name not in module.lora_A or name in module.lora_variant or type(base) is not nn.Linear:
        return None
    drop, b = module.lora_dropout[name], module.lora_B[name]
    if (isinstance(drop, nn.Dropout) and drop.training and drop.p > 0) or b.bias is not None:
        return None
    if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
        return None
    return name


def _forward(self, x, *args, **kwargs):
    name = None if args or kwargs else _plain(self)
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)
    base, a, b = self.base_layer, self.lora_A[name].weight, self.lora_B[name].weight
    weight, bias = base.weight, base.bias
    device = x.device.type
    if torch.is_autocast_enabled(device):  # what autocast does to each product, done once for the op
        dtype = torch.get_autocast_dtype(device)
        x, weight, a, b = (t.to(dtype) for t in (x, weight, a, b))
        bias = None if bias is None else bias.to(dtype)
    if not x.dtype == weight.dtype == a.dtype == b.dtype:
        return type(self).forward(self, x, *args, **kwargs)
    with torch.autocast(device, enabled=False):
        if self._alignkit_last:
            return _FrozenPlus.apply(x, weight, bias, _Delta.apply(x, a, b, self.scaling[name]))
        return _Fused.apply(x, weight, bias, a, b, self.scaling[name])


def fuse_lora(model, checkpointed: bool) -> int:
    """Give every plain peft LoRA Linear the fused forward; with checkpointing, the last one of each
    checkpointed layer the adapter-first order. Returns how many modules were changed."""
    from peft.tuners.lora.layer import Linear
    from transformers.modeling_layers import GradientCheckpointingLayer

    last = set()
    if checkpointed:
        for layer in model.modules():
            if isinstance(layer, GradientCheckpointingLayer):
                inside = [m for m in layer.modules() if type(m) is Linear]
                last.update(map(id, inside[-1:]))
    changed = 0
    for module in model.modules():
        if type(module) is Linear:
            module._alignkit_last = id(module) in last
            module.forward = types.MethodType(_forward, module)
            changed += 1
    return changed
