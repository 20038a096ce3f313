"""LoRA and QLoRA through peft.

task: peft's task type. "SEQ_CLS" (reward models) makes peft train and save the
score head with the adapter (modules_to_save), so final/ reloads with its head.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from omegaconf import MISSING, OmegaConf

from ..config.schema import Dtype
from ..errors import require
from .record import Adapter


@dataclass
class LoraAdapter:
    name: str = MISSING
    r: int = MISSING
    alpha: float = MISSING
    dropout: float = MISSING
    target_modules: Any = MISSING  # "all-linear" or a list of module names


class QuantType(Enum):
    nf4 = "nf4"
    fp4 = "fp4"


@dataclass
class QLoraAdapter(LoraAdapter):
    quant_type: QuantType = MISSING
    double_quant: bool = MISSING
    compute_dtype: Dtype = MISSING


def _lora_config(adapter, task: str):
    from peft import LoraConfig

    targets = adapter.target_modules
    if not isinstance(targets, str):
        targets = list(OmegaConf.to_container(targets))
    return LoraConfig(r=adapter.r, lora_alpha=adapter.alpha, lora_dropout=adapter.dropout,
                      target_modules=targets, task_type=task)


def enable_checkpointing(model) -> None:
    # non-reentrant checkpointing needs no input grads, so frozen embeddings are fine
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def attach_lora(model, adapter, train, task: str = "CAUSAL_LM"):
    from peft import get_peft_model

    if train.gradient_checkpointing:
        enable_checkpointing(model)
    return get_peft_model(model, _lora_config(adapter, task))


def attach_qlora(model, adapter, train, task: str = "CAUSAL_LM"):
    """4-bit base (already loaded by load_base_model) + LoRA, prepared as peft recommends."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=train.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    return get_peft_model(model, _lora_config(adapter, task))


def quantization_config(adapter, device, sharded: bool = False):
    """NF4 settings of a 4-bit base. sharded (FSDP): the 4-bit weights are stored in the compute dtype, a float
    FSDP can shard like the layers' other weights (bitsandbytes' FSDP-QLoRA setting); uint8 otherwise."""
    import torch
    from transformers import BitsAndBytesConfig

    from ..models.load import resolve_dtype

    compute = resolve_dtype(adapter.compute_dtype.value, device)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=adapter.quant_type.value,
        bnb_4bit_use_double_quant=adapter.double_quant,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=compute if sharded else torch.uint8,
    )


def check_lora(cfg, verb: str) -> None:
    a = cfg.adapter
    require(a.r >= 1, "adapter.r", a.r, "must be >= 1")
    require(a.alpha > 0, "adapter.alpha", a.alpha, "must be > 0")
    require(0 <= a.dropout < 1, "adapter.dropout", a.dropout, "must be in [0, 1)")


LORA = Adapter("lora", LoraAdapter, attach_lora, switchable=True, check=check_lora)
QLORA = Adapter("qlora", QLoraAdapter, attach_qlora, switchable=True, four_bit=True, check=check_lora)
