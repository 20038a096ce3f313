"""The method registry: name -> record, each method one file (plus its YAML in configs/method/).

Everything that depends on what a method is reads its record here; no module outside a method's own file
tests a method's name. `compose` and `validate` make and check a config against the registered methods and
adapters.
"""
from __future__ import annotations

from dataclasses import replace

from omegaconf import DictConfig

from ..adapters import ADAPTERS
from ..config.compose import compose_config, load_saved_config
from ..config.validate import validate_common
from ..errors import UsageError
from . import dpo, grpo, kto, orpo, ppo, rloo, rm, sft
from .record import Method

METHODS: dict[str, Method] = {}


def register(method: Method) -> None:
    """Add a method (and its presets, the same record under their own names) to the registry."""
    METHODS[method.name] = method
    for name in method.presets:
        METHODS[name] = replace(method, name=name, presets=(), preset_of=method.name)


for _module in (sft, rm, dpo, kto, orpo, ppo, grpo, rloo):
    register(_module.METHOD)


def method_record(name: str) -> Method:
    if name not in METHODS:
        raise UsageError(f"unknown method '{name}' (choose from {', '.join(METHODS)})")
    return METHODS[name]


def schemas() -> dict[str, dict[str, type]]:
    """The schema of each method and adapter option, as compose_config and load_saved_config take them."""
    return {"method": {n: m.schema for n, m in METHODS.items()},
            "adapter": {n: a.schema for n, a in ADAPTERS.items()}}


def compose(overrides: list[str]) -> DictConfig:
    """configs/config.yaml composed with Hydra overrides, typed by the registered schemas."""
    return compose_config(overrides, schemas())


def saved_config(path) -> DictConfig:
    """A run's config.yaml, typed again by the registered schemas."""
    return load_saved_config(path, schemas())


def validate(cfg: DictConfig, verb: str = "train") -> None:
    """Every check a config must pass before anything loads: the method x adapter pair, each one's own checks,
    the strategy, then the sections every run has."""
    method = method_record(cfg.method.name)
    adapter = ADAPTERS[cfg.adapter.name]
    if adapter.name not in method.adapters:
        raise UsageError(f"method={method.name} does not run with adapter={adapter.name} (valid adapters for "
                         f"{method.name}: {', '.join(method.adapters)}; see `alignkit list`)")
    if method.online:  # it learns from scores of its own completions
        if cfg.reward.kind.value == "model" and cfg.reward.run is None:
            raise UsageError(f"method={method.name} needs a reward: reward.run=RM_RUN_DIR (a method=rm run) or "
                             f"reward=gold")
        if cfg.reward.kind.value == "gold" and cfg.data.task is None:
            raise UsageError("reward=gold needs a built-in task (data.task=...) whose gold judge scores completions")
        if cfg.reward.kind.value == "functions" and not cfg.reward.functions:
            raise UsageError("reward=functions needs reward.functions=[pkg.module:fn, path/to/file.py:fn, ...]")
        weights = cfg.reward.weights
        if cfg.reward.kind.value == "functions" and weights is not None and len(weights) != len(cfg.reward.functions):
            raise UsageError(f"reward.weights has {len(weights)} values for {len(cfg.reward.functions)} "
                             f"reward.functions (one weight each, or null for all 1)")
    if cfg.train.loraplus_lr_ratio is not None and not adapter.loraplus:
        raise UsageError(f"train.loraplus_lr_ratio is LoRA+ (faster B matrices of LoRA): adapter={adapter.name} has "
                         f"none; use {' or '.join(a.name for a in ADAPTERS.values() if a.loraplus)}, or "
                         f"train.loraplus_lr_ratio=null")
    if method.check is not None:
        method.check(cfg)
    if adapter.check is not None:
        adapter.check(cfg, verb)
    if cfg.train.strategy.value == "fsdp":
        for name, ok, why in ((f"method={method.name}", "fsdp" in method.strategies, method.why_not_fsdp),
                              (f"adapter={adapter.name}", adapter.fsdp, adapter.fsdp_why)):
            if not ok:
                raise UsageError(f"{name} does not run with train.strategy=fsdp ({why}): use train.strategy=ddp")
    validate_common(cfg)
