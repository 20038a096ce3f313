"""LoRA and QLoRA through peft, with the LoRA family's options: DoRA, rsLoRA and the inits (lora_init.py).

task: peft's task type. "SEQ_CLS" (reward models) makes peft train and save the
score head with the adapter (modules_to_save), so final/ reloads with its head.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from omegaconf import MISSING, OmegaConf

from ..config.schema import Dtype
from ..errors import UsageError, require
from .lora_rules import INIT, INIT_CHOICES, moves_base, starts_nonzero
from .record import Adapter


@dataclass
class LoraAdapter:
    name: str = MISSING
    r: int = MISSING
    alpha: float = MISSING
    dropout: float = MISSING
    target_modules: Any = MISSING  # "all-linear" or a list of module names
    use_dora: bool = MISSING
    use_rslora: bool = MISSING
    init: str = MISSING  # default | gaussian | pissa | pissa_niter_K | olora | loftq | eva


class QuantType(Enum):
    nf4 = "nf4"
    fp4 = "fp4"


@dataclass
class QLoraAdapter(LoraAdapter):
    quant_type: QuantType = MISSING
    double_quant: bool = MISSING
    compute_dtype: Dtype = MISSING


def module_names(value):
    """A module-name key (adapter.target_modules) as peft takes it: "all-linear", a list of names, or None
    (peft's choice for the architecture)."""
    if value is None or isinstance(value, str):
        return value
    return list(OmegaConf.to_container(value))


def init_lora_weights(init: str):
    """adapter.init -> peft's init_lora_weights. default (and loftq, whose A, B are replaced after attaching:
    lora_init.loftq_init) is peft's True: A kaiming-uniform, B = 0."""
    return True if init in ("default", "loftq") else init


def lora_config(adapter, task: str):
    from peft import EvaConfig, LoraConfig

    return LoraConfig(r=adapter.r, lora_alpha=adapter.alpha, lora_dropout=adapter.dropout,
                      target_modules=module_names(adapter.target_modules), task_type=task, use_dora=adapter.use_dora,
                      use_rslora=adapter.use_rslora, init_lora_weights=init_lora_weights(adapter.init),
                      eva_config=EvaConfig() if adapter.init == "eva" else None)


def enable_checkpointing(model) -> None:
    # non-reentrant checkpointing needs no input grads, so frozen embeddings are fine
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def attach_lora(model, adapter, train, task: str = "CAUSAL_LM"):
    from peft import get_peft_model

    from .lora_fused import fuse_lora
    from .lora_init import finish_init

    if train.gradient_checkpointing:
        enable_checkpointing(model)
    model = finish_init(get_peft_model(model, lora_config(adapter, task)), adapter)
    fuse_lora(model, train.gradient_checkpointing)
    return model


def attach_qlora(model, adapter, train, task: str = "CAUSAL_LM"):
    """4-bit base (already loaded by load_base_model) + LoRA, prepared as peft recommends."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    from .lora_init import finish_init

    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=train.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    return finish_init(get_peft_model(model, lora_config(adapter, task)), adapter)


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
    """Ranges, adapter.init, and the combinations of inits with the 4-bit base, DoRA and FSDP that cannot work."""
    a = cfg.adapter
    require(a.r >= 1, "adapter.r", a.r, "must be >= 1")
    require(a.alpha > 0, "adapter.alpha", a.alpha, "must be > 0")
    require(0 <= a.dropout < 1, "adapter.dropout", a.dropout, "must be in [0, 1)")
    init = str(a.init)
    if not INIT.match(init):
        raise UsageError(f"adapter.init={init} is not a LoRA init (choose from {INIT_CHOICES})")
    if a.name == "qlora" and moves_base(init):
        raise UsageError(f"adapter=qlora adapter.init={init}: the 4-bit base would hold the quantised residual "
                         f"W - sBA, so final/ could not apply to the original base (peft's conversion is exact in "
                         f"full precision only): use adapter=lora adapter.init={init}, or adapter.init=loftq on 4 bits")
    if a.name == "lora" and init == "loftq":
        raise UsageError("adapter.init=loftq is the quantisation-aware init of the 4-bit base: use adapter=qlora "
                         "adapter.init=loftq (on a full-precision base LoftQ replaces the base weights by their 4-bit "
                         "values, which final/, an adapter of the original base, cannot carry)")
    if a.use_dora and moves_base(init):
        raise UsageError(f"adapter.use_dora=true with adapter.init={init}: final/ must apply to the original base, "
                         f"and peft converts plain LoRA matrices only (not DoRA's magnitudes): drop one of the two")
    if starts_nonzero(init) and cfg.train.strategy.value == "fsdp":
        raise UsageError(f"adapter.init={init} does not run with train.strategy=fsdp (its reference is a second, "
                         f"frozen adapter switched in for reference passes, which sharded weights do not allow): "
                         f"use train.strategy=ddp")


def init_from_data(model, adapter, batches) -> None:
    """adapter.init=eva: peft's EVA from the training batches (lora_init.eva_init); nothing for the other inits."""
    if adapter.init == "eva":
        from . import lora_init

        lora_init.eva_init(model, batches())


def keeps_base(adapter) -> bool:
    return not moves_base(str(adapter.init))


LORA_FAMILY = dict(switchable=True, check=check_lora, mergeable=True, loraplus=True, data_init=init_from_data,
                   keeps_base=keeps_base)
LORA = Adapter("lora", LoraAdapter, attach_lora, presets=("dora", "pissa"), **LORA_FAMILY)
QLORA = Adapter("qlora", QLoraAdapter, attach_qlora, four_bit=True, **LORA_FAMILY)
