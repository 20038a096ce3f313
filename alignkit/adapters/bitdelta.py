"""BitDelta training: full fine-tuning of only the linear weights inside the transformer blocks.

Embeddings, lm_head, norms and biases stay frozen, so the whole fine-tune is the set of deltas that
BitDelta stores in one bit each; after training the runner compresses it (alignkit.bitdelta), and final/
holds only that artifact. The same schema serves `alignkit compress` (adapter.finetuned).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Optional

from omegaconf import MISSING

from ..errors import UsageError, require
from .lora import enable_checkpointing
from .record import Adapter


class DistillLoss(Enum):
    kl = "kl"
    mse = "mse"


@dataclass
class BitDeltaAdapter:
    name: str = MISSING
    distill_steps: int = MISSING
    lr: float = MISSING
    distill_loss: DistillLoss = MISSING
    gold_max_new_tokens: int = MISSING
    finetuned: Optional[str] = MISSING  # alignkit compress only: the fine-tuned model


def attach_bitdelta(model, adapter, train, task: str = "CAUSAL_LM"):
    from ..models.blocks import block_linears

    if train.gradient_checkpointing:
        enable_checkpointing(model)
    trainable = {f"{name}.weight" for name in block_linears(model)}
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)
    return model


def check_bitdelta(cfg, verb: str) -> None:
    a = cfg.adapter
    require(a.distill_steps >= 0, "adapter.distill_steps", a.distill_steps, "must be >= 0 (0 = no distillation)")
    require(a.lr >= 0, "adapter.lr", a.lr, "must be >= 0")
    require(a.gold_max_new_tokens >= 1, "adapter.gold_max_new_tokens", a.gold_max_new_tokens, "must be >= 1")
    if verb == "compress":
        if a.finetuned is None:
            raise UsageError("compress needs finetuned=PATH (the fine-tuned model) and base=PATH (its base)")
        if cfg.run.resume is not False:
            raise UsageError("alignkit compress does not resume: leave run.resume=false")
    elif a.finetuned is not None:
        raise UsageError("adapter.finetuned is for alignkit compress; alignkit train compresses the model it trains")


BITDELTA = Adapter("bitdelta", BitDeltaAdapter, attach_bitdelta, trains_base=True, final="bitdelta", fsdp=False,
                   fsdp_why="the 1-bit compression after training needs the whole model in one process",
                   check=check_bitdelta, mergeable=True)
