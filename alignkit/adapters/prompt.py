"""Prompt tuning and prefix tuning through peft.

peft holds the parameters, saves and reloads them (final/ is a plain peft adapter dir, with
the score head for a reward model: peft puts `score` in modules_to_save for SEQ_CLS). The
forward and generate calls carry the virtual tokens through alignkit.forward.virtual.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from omegaconf import MISSING

from ..errors import UsageError, require
from .lora import enable_checkpointing
from .record import Adapter


@dataclass
class PromptAdapter:
    name: str = MISSING
    num_virtual_tokens: int = MISSING
    init_text: Optional[str] = MISSING  # text whose token embeddings start the soft prompt; null = random


@dataclass
class PrefixAdapter:
    name: str = MISSING
    num_virtual_tokens: int = MISSING
    prefix_projection: bool = MISSING  # train the prefix through an MLP (reparameterisation)
    projection_hidden_size: int = MISSING



def attach_prompt(model, adapter, train, task: str = "CAUSAL_LM"):
    from peft import PromptTuningConfig, PromptTuningInit, get_peft_model

    if train.gradient_checkpointing:
        enable_checkpointing(model)
    text = adapter.init_text
    config = PromptTuningConfig(
        task_type=task, num_virtual_tokens=adapter.num_virtual_tokens,
        prompt_tuning_init=PromptTuningInit.TEXT if text is not None else PromptTuningInit.RANDOM,
        prompt_tuning_init_text=text, tokenizer_name_or_path=model.name_or_path if text is not None else None,
    )
    return get_peft_model(model, config)


def attach_prefix(model, adapter, train, task: str = "CAUSAL_LM"):
    """Gradient checkpointing is refused by validation: the prefix is a KV cache that checkpointing drops."""
    from peft import PrefixTuningConfig, get_peft_model

    config = PrefixTuningConfig(task_type=task, num_virtual_tokens=adapter.num_virtual_tokens,
                                prefix_projection=adapter.prefix_projection,
                                encoder_hidden_size=adapter.projection_hidden_size)
    return get_peft_model(model, config)


def check_prompt(cfg, verb: str) -> None:
    a = cfg.adapter
    require(a.num_virtual_tokens >= 1, "adapter.num_virtual_tokens", a.num_virtual_tokens, "must be >= 1")
    if a.init_text is not None:
        require(a.init_text.strip() != "", "adapter.init_text", repr(a.init_text), "must be text, or null for random")


def check_prefix(cfg, verb: str) -> None:
    a = cfg.adapter
    require(a.num_virtual_tokens >= 1, "adapter.num_virtual_tokens", a.num_virtual_tokens, "must be >= 1")
    require(a.projection_hidden_size >= 1, "adapter.projection_hidden_size", a.projection_hidden_size, "must be >= 1")
    if cfg.train.gradient_checkpointing:
        raise UsageError("adapter=prefix does not work with train.gradient_checkpointing=true (the prefix lives "
                         "in the attention cache, which checkpointing recomputes without it): set it to false")


NOT_FSDP = ("peft saves it by running its prompt encoder outside the sharded forward; DDP fits it anyway: its few "
            "trainable weights need no sharding")
PROMPT = Adapter("prompt", PromptAdapter, attach_prompt, virtual_tokens=True, fsdp=False, fsdp_why=NOT_FSDP,
                 check=check_prompt)
PREFIX = Adapter("prefix", PrefixAdapter, attach_prefix, virtual_tokens=True, fsdp=False, fsdp_why=NOT_FSDP,
                 check=check_prefix)
