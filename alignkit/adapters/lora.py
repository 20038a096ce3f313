"""LoRA and QLoRA through peft.

task: peft's task type. "SEQ_CLS" (reward models) makes peft train and save the
score head with the adapter (modules_to_save), so final/ reloads with its head.
"""
from __future__ import annotations

from omegaconf import OmegaConf


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
