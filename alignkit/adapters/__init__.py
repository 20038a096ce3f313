"""Adapters: one record per name (what it trains, what it can do), and the base-loading options it needs."""
from __future__ import annotations

from .bitdelta import BITDELTA
from .family import IA3, LOHA, LOKR, VERA
from .full import FULL
from .lora import LORA, QLORA, quantization_config
from .prompt import PREFIX, PROMPT
from .record import Adapter

ADAPTERS: dict[str, Adapter] = {a.name: a for a in (PROMPT, PREFIX, LORA, QLORA, FULL, BITDELTA, VERA, LOHA, LOKR,
                                                     IA3)}


def adapter_record(name: str) -> Adapter:
    return ADAPTERS[name]


def attach_adapter(model, adapter_cfg, train_cfg, task: str = "CAUSAL_LM"):
    """task: "CAUSAL_LM" (policies) or "SEQ_CLS" (reward models with a score head)."""
    return ADAPTERS[adapter_cfg.name].attach(model, adapter_cfg, train_cfg, task)


def base_load_options(adapter_cfg, device, sharded: bool = False) -> dict:
    """load_base_model's keywords for this adapter: the 4-bit settings, and fp32 master weights for adapters that
    train the base weights. sharded: FSDP (the 4-bit weights then stored in the compute dtype)."""
    record = ADAPTERS[adapter_cfg.name]
    return {"quantization": quantization_config(adapter_cfg, device, sharded) if record.four_bit else None,
            "full_weights": record.trains_base}


def packing(cfg) -> bool:
    """train.packing, except for adapters with virtual tokens (they need the padded layout)."""
    return cfg.train.packing and not ADAPTERS[cfg.adapter.name].virtual_tokens
