"""Use a BitDelta artifact: merge it into a base model, or serve several over one base.

    from alignkit.bitdelta import apply, attach_deltas, use_delta
    model = apply(AutoModelForCausalLM.from_pretrained(base_dir), "RUN/final")   # W_base + α·S merged

    attach_deltas(base, {"math": "runs/a/final", "chat": "runs/b/final"})      # base weights held once
    use_delta(base, "math"); base.generate(...)                                  # x W^T + α_math x S^T
    use_delta(base, None)                                                        # the plain base
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import UsageError
from .artifact import load_artifact
from .compress import Delta, base_fingerprint
from .linear import BitDeltaLinear, wrap_linears
from .pack import reconstruct


def _parameter(model: nn.Module, name: str) -> nn.Parameter:
    """model's parameter by its unwrapped name (a wrapped linear's weight lives in .base)."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    return getattr(module.base if isinstance(module, BitDeltaLinear) else module, attr)


def check_fits(model: nn.Module, delta: Delta, manifest: dict, fingerprint: str | None) -> None:
    """Every linear and extra exists in model with the artifact's shape; fingerprint (the model's,
    None = skip) equals the base's the artifact was made from."""
    wanted = {f"{n}.weight": s for n, s in delta.shapes.items()}
    wanted.update({n: tuple(v.shape) for n, v in delta.extras.items()})
    for name, shape in wanted.items():
        try:
            have = tuple(_parameter(model, name).shape)
        except AttributeError:
            raise UsageError(f"the artifact needs {name}, which this base model does not have") from None
        if have != tuple(shape):
            raise UsageError(f"{name}: shape {list(have)} in this base, {list(shape)} in the artifact "
                             f"(made for base {manifest.get('base_model')})")
    if fingerprint is not None and fingerprint != manifest.get("base_sha256"):
        raise UsageError(f"this base is not the one the artifact was made from ({manifest.get('base_model')}: "
                         f"weights sha256 {str(manifest.get('base_sha256'))[:12]}..., this base "
                         f"{fingerprint[:12]}...; a different dtype changes it too); pass verify=False to apply anyway")


def merge(model: nn.Module, delta: Delta) -> nn.Module:
    """In place: W = W_base + α·S for every compressed linear (summed in fp32, stored in W's dtype)
    and the extras copied in."""
    with torch.no_grad():
        for name, packed in delta.signs.items():
            weight = _parameter(model, f"{name}.weight")
            dense = reconstruct(packed.to(weight.device), delta.shapes[name], delta.scales[name].to(weight.device))
            weight.copy_(weight.float() + dense)
        for name, value in delta.extras.items():
            _parameter(model, name).copy_(value)
    return model


def apply(base_model: nn.Module, artifact_dir, verify: bool = True) -> nn.Module:
    """base_model with the BitDelta fine-tune merged in (modified in place and returned).

    verify: check the base's weights hash to the one the artifact records (shapes are always checked).
    """
    delta, manifest = load_artifact(artifact_dir)
    check_fits(base_model, delta, manifest, base_fingerprint(base_model) if verify else None)
    return merge(base_model, delta)


def attach_deltas(model: nn.Module, artifacts: dict[str, str | Path], verify: bool = True) -> None:
    """Load several artifacts over one base held once: each block linear keeps W_base and gets each
    fine-tune's packed signs and scale; each fine-tune's extras are kept aside. Select with use_delta."""
    served = model.__dict__.setdefault("_bitdelta", {"extras": {}, "base": {}, "fingerprint": None})
    if verify and served["fingerprint"] is None:
        use_delta(model, None)
        served["fingerprint"] = base_fingerprint(model)
    device = next(model.parameters()).device
    for name, path in artifacts.items():
        delta, manifest = load_artifact(path)
        check_fits(model, delta, manifest, served["fingerprint"] if verify else None)
        for module_name, layer in wrap_linears(model, list(delta.signs)).items():
            layer.add_delta(name, delta.signs[module_name], delta.scales[module_name])
        for param_name in delta.extras:
            served["base"].setdefault(param_name, _parameter(model, param_name).data)
        served["extras"][name] = {k: v.to(device) for k, v in delta.extras.items()}
    for p in model.parameters():
        p.requires_grad_(False)


def use_delta(model: nn.Module, name: str | None) -> None:
    """Switch a model prepared by attach_deltas to the fine-tune `name` (None: the base)."""
    served = model.__dict__.get("_bitdelta")
    if served is None:
        if name is None:
            return
        raise UsageError("use_delta: call attach_deltas on this model first")
    if name is not None and name not in served["extras"]:
        raise UsageError(f"use_delta: no fine-tune named {name!r} (attached: {', '.join(served['extras'])})")
    for module in model.modules():
        if isinstance(module, BitDeltaLinear):
            module.active = name if name in module.scales else None
    extras = served["extras"].get(name, {})
    for param_name, base_value in served["base"].items():
        # swap storage, no copy: tied parameters (embeddings = lm_head) follow automatically
        _parameter(model, param_name).data = extras.get(param_name, base_value)
