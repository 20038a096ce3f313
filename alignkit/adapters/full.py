"""Full fine-tuning: every weight trainable."""
from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING

from .lora import enable_checkpointing
from .record import Adapter


@dataclass
class FullAdapter:
    name: str = MISSING


def attach_full(model, adapter, train, task: str = "CAUSAL_LM"):
    if train.gradient_checkpointing:
        enable_checkpointing(model)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


FULL = Adapter("full", FullAdapter, attach_full, trains_base=True, mergeable=True)
