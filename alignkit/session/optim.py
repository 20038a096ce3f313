"""The optimizer (torch AdamW or bitsandbytes' 8-bit / paged versions) and fp16's gradient scaler."""
from __future__ import annotations

import math
import warnings

import torch


def make_optimizer(name: str, params, lr: float, weight_decay: float, device: torch.device, model=None,
                   loraplus_lr_ratio: float | None = None):
    """adamw (torch) or bitsandbytes' 8-bit / paged AdamW; paged falls back off-GPU.

    loraplus_lr_ratio (LoRA+, Hayou et al. 2024): peft's create_loraplus_optimizer over model's trainable
    weights: LoRA's B matrices and every 1-D weight (biases, DoRA magnitudes) at lr x ratio, the rest (A
    matrices; LoRA on embeddings too) at lr, in their own param groups; the schedule scales every group."""
    cls = optimizer_class(name, device)
    if loraplus_lr_ratio is None:
        return cls(params, lr=lr, weight_decay=weight_decay)
    from peft.optimizers import create_loraplus_optimizer

    return create_loraplus_optimizer(model, cls, lr=lr, loraplus_lr_ratio=loraplus_lr_ratio,
                                     loraplus_weight_decay=weight_decay, loraplus_lr_embedding=lr)


def optimizer_class(name: str, device: torch.device):
    if name == "adamw":
        return torch.optim.AdamW
    import bitsandbytes as bnb

    if name.startswith("paged_") and device.type != "cuda":
        warnings.warn(f"train.optimizer={name}: paged optimizers need CUDA; using the non-paged version on "
                      f"{device.type}", stacklevel=3)
        name = name.removeprefix("paged_")
    return {
        "adamw_8bit": bnb.optim.AdamW8bit,
        "adamw_32bit": torch.optim.AdamW,
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
        "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
    }[name]


def make_scaler(precision: str, device: torch.device):
    """fp16: a gradient scaler (small fp16 gradients underflow to 0 unscaled); None for fp32/bf16."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


def clipped_step(optimizer, scheduler, params, max_grad_norm: float, loss: float,
                 scaler=None) -> tuple[float, bool, bool]:
    """Unscale (fp16), clip, step (skipped when the loss or gradient is NaN/inf), advance the schedule:
    (grad_norm, ok, overflow). overflow: the fp16 scaler's own skip (finite loss, inf gradient while the
    scale is still being found), which lowers the scale and is counted, but is no sign of divergence."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    clip = max_grad_norm if max_grad_norm > 0 else float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
    ok = math.isfinite(loss) and math.isfinite(grad_norm)
    overflow = scaler is not None and not ok and math.isfinite(loss) and scaler.get_scale() > 1.0
    if ok:
        scaler.step(optimizer) if scaler is not None else optimizer.step()
    if scaler is not None:
        scaler.update()
    with warnings.catch_warnings():  # a skipped first step: "lr_scheduler.step() before optimizer.step()"
        warnings.simplefilter("ignore", UserWarning)
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, ok, overflow
