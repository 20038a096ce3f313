"""Δ = W_finetuned - W_base -> sign bits + one scale per block linear; other changed tensors kept whole.

Which layers: every nn.Linear inside the transformer blocks, found by walking the modules (the
ModuleList of decoder layers), not by Llama-style names, so any causal LM transformers loads works.
Tensors outside them (embeddings, lm_head, norms) or inside but not a Linear weight (biases, norms)
that differ between the two models are kept at full precision as "extras" and listed in the report.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import UsageError

from .linear import BitDeltaLinear, base_named_parameters, wrap_linears
from .pack import initial_scale, pack_signs


@dataclass
class Delta:
    """A BitDelta fine-tune: per block linear (module name) packed signs, fp32 scale and shape;
    per other changed parameter (parameter name) its fine-tuned value."""
    signs: dict[str, torch.Tensor] = field(default_factory=dict)
    scales: dict[str, torch.Tensor] = field(default_factory=dict)
    shapes: dict[str, tuple] = field(default_factory=dict)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


def check_same_shapes(base: nn.Module, finetuned: nn.Module) -> None:
    """Same parameter names and shapes, or a UsageError naming the first difference."""
    have = {n: tuple(p.shape) for n, p in base.named_parameters()}
    want = {n: tuple(p.shape) for n, p in finetuned.named_parameters()}
    for name in sorted(have.keys() | want.keys()):
        if have.get(name) != want.get(name):
            raise UsageError(f"finetuned does not match base: {name} has {_shape_text(want.get(name))} in "
                             f"finetuned and {_shape_text(have.get(name))} in base (BitDelta needs the same "
                             f"architecture)")


def _shape_text(shape) -> str:
    return "no such parameter" if shape is None else f"shape {list(shape)}"


def base_fingerprint(model: nn.Module) -> str:
    """sha256 of every parameter (name, shape, values as float32), to check an artifact meets its base."""
    digest = hashlib.sha256()
    for name, p in sorted(base_named_parameters(model), key=lambda item: item[0]):
        digest.update(f"{name}{list(p.shape)}".encode())
        digest.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def binarize(base: nn.Module, finetuned: nn.Module, linears: list[str]) -> Delta:
    """Signs and α = mean|Δ| of each block linear's weight delta (computed in fp32, one layer at a
    time); every other parameter that differs is kept as it is in the fine-tuned model."""
    have, want = dict(base.named_parameters()), dict(finetuned.named_parameters())
    delta = Delta()
    for name in linears:
        diff = want[f"{name}.weight"].detach().float() - have[f"{name}.weight"].detach().float()
        delta.signs[name] = pack_signs(diff).cpu()
        delta.scales[name] = initial_scale(diff).cpu()
        delta.shapes[name] = tuple(diff.shape)
    weights = {f"{name}.weight" for name in linears}
    for name, value in want.items():
        if name not in weights and not torch.equal(value, have[name]):
            delta.extras[name] = value.detach().cpu()
    if not delta.extras and all(float(s) == 0 for s in delta.scales.values()):
        raise UsageError("base and finetuned have the same weights: there is no fine-tune to compress")
    return delta


def make_student(base: nn.Module, delta: Delta) -> dict[str, BitDeltaLinear]:
    """Turn base (in place) into W_base + α·S with trainable α's and everything else frozen:
    extras copied in, block linears wrapped with the delta as "student", active."""
    for p in base.parameters():
        p.requires_grad_(False)
    params = dict(base.named_parameters())
    with torch.no_grad():
        for name, value in delta.extras.items():
            params[name].copy_(value)
    layers = wrap_linears(base, list(delta.signs))
    for name, layer in layers.items():
        layer.add_delta("student", delta.signs[name], delta.scales[name], trainable=True)
        layer.active = "student"
    return layers
