"""Adapters: one registry name -> a function that makes the base trainable."""
from __future__ import annotations

from .bitdelta import attach_bitdelta
from .full import attach_full
from .lora import attach_lora, attach_qlora
from .prompt import attach_prefix, attach_prompt

ATTACH = {
    "prompt": attach_prompt,
    "prefix": attach_prefix,
    "lora": attach_lora,
    "qlora": attach_qlora,
    "full": attach_full,
    "bitdelta": attach_bitdelta,
}

# adapters that train the base weights themselves: fp32 master weights under dtype=auto, and no
# adapter to switch off for a DPO reference (its log-probs are precomputed instead)
WEIGHT_ADAPTERS = ("full", "bitdelta")


def attach_adapter(model, adapter_cfg, train_cfg, task: str = "CAUSAL_LM"):
    """task: "CAUSAL_LM" (policies) or "SEQ_CLS" (reward models with a score head)."""
    return ATTACH[adapter_cfg.name](model, adapter_cfg, train_cfg, task)
