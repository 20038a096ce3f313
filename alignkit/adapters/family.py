"""The other merge-able peft adapters: VeRA, LoHa, LoKr and IA³, on a full-precision base.

Each starts as the base (VeRA's b = 0, one LoHa/LoKr factor = 0, IA³'s vectors = 1), so the reference is
the base with the adapter off, as for LoRA. A reward model also trains its score head (peft's
modules_to_save for SEQ_CLS).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import MISSING

from ..errors import UsageError, require
from .lora import enable_checkpointing, module_names
from .record import Adapter


@dataclass
class VeraAdapter:
    name: str = MISSING
    r: int = MISSING
    d_initial: float = MISSING
    dropout: float = MISSING
    target_modules: Any = MISSING
    projection_prng_key: int = MISSING


@dataclass
class LohaAdapter:
    name: str = MISSING
    r: int = MISSING
    alpha: float = MISSING
    rank_dropout: float = MISSING
    module_dropout: float = MISSING
    target_modules: Any = MISSING


@dataclass
class LokrAdapter(LohaAdapter):
    decompose_both: bool = MISSING
    decompose_factor: int = MISSING


@dataclass
class IA3Adapter:
    name: str = MISSING
    target_modules: Any = MISSING  # null = peft's per-architecture default
    feedforward_modules: Any = MISSING


def _attach(model, config, train):
    from peft import get_peft_model

    if train.gradient_checkpointing:
        enable_checkpointing(model)
    try:
        return get_peft_model(model, config)
    except ValueError as exc:  # target modules this model does not have, IA³'s feed-forward subset, ...
        raise UsageError(f"adapter={config.peft_type.value.lower()}: peft refused the adapter: "
                         f"{str(exc).strip().splitlines()[0]}") from exc


def attach_vera(model, adapter, train, task: str = "CAUSAL_LM"):
    from peft import VeraConfig

    return _attach(model, VeraConfig(r=adapter.r, d_initial=adapter.d_initial, vera_dropout=adapter.dropout,
                                     target_modules=module_names(adapter.target_modules), task_type=task, save_projection=True,
                                     projection_prng_key=adapter.projection_prng_key), train)


def attach_loha(model, adapter, train, task: str = "CAUSAL_LM"):
    from peft import LoHaConfig

    return _attach(model, LoHaConfig(r=adapter.r, alpha=adapter.alpha, rank_dropout=adapter.rank_dropout,
                                     module_dropout=adapter.module_dropout, target_modules=module_names(adapter.target_modules),
                                     task_type=task), train)


def attach_lokr(model, adapter, train, task: str = "CAUSAL_LM"):
    from peft import LoKrConfig

    return _attach(model, LoKrConfig(r=adapter.r, alpha=adapter.alpha, rank_dropout=adapter.rank_dropout,
                                     module_dropout=adapter.module_dropout, target_modules=module_names(adapter.target_modules),
                                     decompose_both=adapter.decompose_both,
                                     decompose_factor=adapter.decompose_factor, task_type=task), train)


def attach_ia3(model, adapter, train, task: str = "CAUSAL_LM"):
    from peft import IA3Config

    return _attach(model, IA3Config(target_modules=module_names(adapter.target_modules),
                                    feedforward_modules=module_names(adapter.feedforward_modules),
                                    task_type=task), train)


def check_vera(cfg, verb: str) -> None:
    a = cfg.adapter
    require(a.r >= 1, "adapter.r", a.r, "must be >= 1")
    require(0 <= a.dropout < 1, "adapter.dropout", a.dropout, "must be in [0, 1)")


def check_lycoris(cfg, verb: str) -> None:
    a = cfg.adapter
    require(a.r >= 1, "adapter.r", a.r, "must be >= 1")
    require(a.alpha > 0, "adapter.alpha", a.alpha, "must be > 0")
    for key in ("rank_dropout", "module_dropout"):
        require(0 <= a[key] < 1, f"adapter.{key}", a[key], "must be in [0, 1)")


VERA = Adapter("vera", VeraAdapter, attach_vera, mergeable=True, check=check_vera)
LOHA = Adapter("loha", LohaAdapter, attach_loha, mergeable=True, check=check_lycoris)
LOKR = Adapter("lokr", LokrAdapter, attach_lokr, mergeable=True, check=check_lycoris)
IA3 = Adapter("ia3", IA3Adapter, attach_ia3, mergeable=True)
