"""Reading finished run directories: a run's model as it trained it, its config, and a run's policy as the base
of another (policy.init)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ..adapters import ADAPTERS, base_load_options
from ..bitdelta.apply import apply
from ..errors import UsageError
from ..methods import method_record, saved_config
from ..models.cache import cached
from ..models.load import load_base_model, pick_device


def finished_run(run_dir, role: str = "") -> tuple[Path, DictConfig]:
    """(run dir, its config) of a finished run, or a one-line error naming `role` (e.g. "policy.init")."""
    run_dir = Path(run_dir)
    if not (run_dir / "final").is_dir() or not (run_dir / "config.yaml").exists():
        raise UsageError(f"{role + ': ' if role else ''}{run_dir} is not a finished alignkit run "
                         f"(no final/ or config.yaml)")
    return run_dir, saved_config(run_dir / "config.yaml")


def head_of(cfg) -> str:
    """The model head the run's method trains: "lm" (policies, value heads aside) or "score"."""
    return "score" if method_record(cfg.method.name).head == "score" else "lm"


def load_run(run_dir, device: torch.device | None = None):
    """Load a finished run's final/ as its method trained it: (model in eval mode, tokenizer, cfg).

    A peft adapter: the base (4-bit again for qlora) + the adapter (with its score head for an RM); an adapter
    that trains the base weights: final/ is a complete model dir, or (bitdelta) the base with the 1-bit delta."""
    run_dir, cfg = finished_run(run_dir)
    device = device or pick_device()
    head, final = head_of(cfg), run_dir / "final"
    adapter = ADAPTERS[cfg.adapter.name]
    options = base_load_options(cfg.adapter, device)
    if adapter.final == "bitdelta":  # final/ is the 1-bit delta: base + alpha * sign
        model, tokenizer, _ = load_base_model(base_model_cfg(cfg), device, head, **options)
        model = apply(model, final)
    elif adapter.trains_base:
        model, tokenizer, _ = load_base_model(OmegaConf.merge(cfg.model, {"path": str(final)}), device, head,
                                              **options)
    else:
        from peft import PeftModel

        model, tokenizer, _ = load_base_model(base_model_cfg(cfg), device, head, **options)
        model = PeftModel.from_pretrained(model, str(final))
    return model.eval(), tokenizer, cfg


def base_model_cfg(cfg: DictConfig) -> DictConfig:
    """The base a run trains on: model.*, or with policy.init that run's policy (so also the reference)."""
    if cfg.policy.init is None:
        return cfg.model
    return OmegaConf.merge(cfg.model, {"path": policy_init_dir(cfg.policy.init)})


def policy_init_dir(init_run) -> str:
    """A model dir holding a finished run's policy: its final/ (full) or base + LoRA merged once (cached).

    A LoRA trained on a 4-bit base (qlora) is merged into the full-precision base: a close approximation of
    the policy it was trained as."""
    from peft import PeftModel

    init_run, cfg = finished_run(init_run, "policy.init")
    final = init_run / "final"
    if head_of(cfg) != "lm":
        raise UsageError(f"policy.init: {init_run} is a method={cfg.method.name} run, not a policy")
    adapter = ADAPTERS[cfg.adapter.name]
    if adapter.trains_base and adapter.final == "model":
        return str(final)
    if not adapter.switchable:
        raise UsageError(f"policy.init: cannot merge a {cfg.adapter.name} adapter into the base; "
                         f"start from a run of {', '.join(a.name for a in ADAPTERS.values() if a.switchable)} "
                         f"or full")
    stamp = max(p.stat().st_mtime_ns for p in final.iterdir())
    key = hashlib.sha256(f"{final.resolve()}|{stamp}".encode()).hexdigest()[:16]

    def build(out: Path) -> None:
        base, tokenizer, _ = load_base_model(OmegaConf.merge(base_model_cfg(cfg), {"dtype": "float32"}),
                                             torch.device("cpu"))
        merged = PeftModel.from_pretrained(base, str(final)).merge_and_unload()
        merged.save_pretrained(out)
        tokenizer.save_pretrained(out)

    return str(cached(f"policy-{init_run.name}-{key}", build))
