"""BitDelta training: full fine-tuning of only the linear weights inside the transformer blocks.

Embeddings, lm_head, norms and biases stay frozen, so the whole fine-tune is the set of deltas that
BitDelta stores in one bit each; after training the runner compresses it (alignkit.bitdelta).
"""
from __future__ import annotations

from ..bitdelta.compress import block_linears
from .lora import enable_checkpointing


def attach_bitdelta(model, adapter, train, task: str = "CAUSAL_LM"):
    if train.gradient_checkpointing:
        enable_checkpointing(model)
    trainable = {f"{name}.weight" for name in block_linears(model)}
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)
    return model
