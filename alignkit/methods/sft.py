"""SFT: next-token cross-entropy on the completion tokens (or every token)."""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from omegaconf import MISSING

from ..adapters import ADAPTERS, packing
from ..data.tokenize import encode_rows
from .record import Method


@dataclass
class SFTMethod:
    name: str = MISSING
    completion_only_loss: bool = MISSING


def sft_step(model, batch: dict, denominator: int, method=None):
    from ..forward.logps import counted_token_logps
    from ..objectives import sft_loss

    lp, mask = counted_token_logps(model, batch)
    return sft_loss(lp, mask, num_tokens=denominator), {}


def prepare(cfg, tokenizer, rows):
    from ..data.collate import collate_sft

    examples = encode_rows(tokenizer, rows, cfg.data, "sft", cfg.method.completion_only_loss)
    return examples, partial(collate_sft, pad_id=tokenizer.pad_token_id, packed=packing(cfg))


METHOD = Method("sft", SFTMethod, data="sft", head="lm", adapters=tuple(ADAPTERS), metrics=("loss", "grad_norm"),
                prepare=prepare, step=sft_step, reference=lambda m: False)
