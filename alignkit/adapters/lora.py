"""LoRA and QLoRA through peft."""
from __future__ import annotations

from omegaconf import OmegaConf


def _lora_config(adapter):
    from peft import LoraConfig

    targets = adapter.target_modules
    if not isinstance(targets, str):
        targets = list(OmegaConf.to_container(targets))
    return LoraConfig(r=adapter.r, lora_alpha=adapter.alpha, lora_dropout=adapter.dropout,
                      target_modules=targets, task_type="CAUSAL_LM")


def enable_checkpointing(model) -> None:
    # non-reentrant checkpointing needs no input grads, so frozen embeddings are fine
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def attach_lora(model, adapter, train):
    from peft import get_peft_model

    if train.gradient_checkpointing:
        enable_checkpointing(model)
    return get_peft_model(model, _lora_config(adapter))


def attach_qlora(model, adapter, train):
    """4-bit base (already loaded by load_base_model) + LoRA, prepared as peft recommends."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=train.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    return get_peft_model(model, _lora_config(adapter))
