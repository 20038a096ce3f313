"""SFT stage: next-token cross-entropy on completion tokens."""
from __future__ import annotations

from functools import partial

from ..data.collate import collate_sft
from ..data.tokenize import encode_rows
from ..objectives import sft_loss
from .common import counted_token_logps, packing


def sft_step(model, batch: dict, denominator: int):
    lp, mask = counted_token_logps(model, batch)
    loss = sft_loss(lp, mask, num_tokens=denominator)
    return loss, {}


def prepare(cfg, tokenizer, rows):
    examples = encode_rows(tokenizer, rows, cfg.data, "sft", cfg.method.completion_only_loss)
    return examples, partial(collate_sft, pad_id=tokenizer.pad_token_id, packed=packing(cfg)), sft_step
