"""Adapters: one registry name -> a function that makes the base trainable."""
from __future__ import annotations

from .full import attach_full
from .lora import attach_lora, attach_qlora
from .prompt import attach_prefix, attach_prompt

ATTACH = {
    "prompt": attach_prompt,
    "prefix": attach_prefix,
    "lora": attach_lora,
    "qlora": attach_qlora,
    "full": attach_full,
}


def attach_adapter(model, adapter_cfg, train_cfg, task: str = "CAUSAL_LM"):
    """task: "CAUSAL_LM" (policies) or "SEQ_CLS" (reward models with a score head)."""
    return ATTACH[adapter_cfg.name](model, adapter_cfg, train_cfg, task)
