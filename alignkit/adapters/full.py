"""Full fine-tuning: every weight trainable."""
from __future__ import annotations

from .lora import enable_checkpointing


def attach_full(model, adapter, train, task: str = "CAUSAL_LM"):
    if train.gradient_checkpointing:
        enable_checkpointing(model)
    for p in model.parameters():
        p.requires_grad_(True)
    return model
