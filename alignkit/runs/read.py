"""Reading finished run directories: a run's model as it trained it, its config, the run merged into one plain
model (export), and a run's policy as the base of another (policy.init)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ..adapters import ADAPTERS, base_load_options
from ..adapters.reference import REFERENCE
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
        if (final / REFERENCE).is_dir():  # a LoftQ run's initial adapter: its reference (adapters/reference.py)
            model.load_adapter(str(final / REFERENCE), adapter_name=REFERENCE)
    return model.eval(), tokenizer, cfg


def base_model_cfg(cfg: DictConfig) -> DictConfig:
    """The base a run trains on: model.*, or with policy.init that run's policy (so also the reference)."""
    if cfg.policy.init is None:
        return cfg.model
    return OmegaConf.merge(cfg.model, {"path": policy_init_dir(cfg.policy.init)})


def policy_init_dir(init_run) -> str:
    """A model dir holding a finished run's policy: its final/ (full), or its adapter merged into its base once
    (cached; any mergeable adapter: merged_model below). A LoRA trained on a 4-bit base (qlora) is merged into the
    dequantised 4-bit base: the weights the policy was trained as."""
    init_run, cfg = finished_run(init_run, "policy.init")
    final = init_run / "final"
    if head_of(cfg) != "lm":
        raise UsageError(f"policy.init: {init_run} is a method={cfg.method.name} run, not a policy")
    adapter = ADAPTERS[cfg.adapter.name]
    if adapter.trains_base and adapter.final == "model":
        return str(final)
    check_mergeable(cfg, "policy.init")
    stamp = max(p.stat().st_mtime_ns for p in final.iterdir())
    key = hashlib.sha256(f"{final.resolve()}|{stamp}".encode()).hexdigest()[:16]

    def build(out: Path) -> None:
        merged, tokenizer = merged_model(init_run, cfg, "lm")
        merged.save_pretrained(out)
        tokenizer.save_pretrained(out)

    return str(cached(f"policy-{init_run.name}-{key}", build))


# A run merged: its adapter folded into the weights, one plain transformers model (`alignkit export`, policy.init).
# Merging is why the LoRA family has no inference latency: W <- W + ΔW once, then the model is the base
# architecture. peft adapters: the base in fp32 + final/, peft's merge_and_unload (a reward model keeps its score
# head); a 4-bit base (qlora): loaded as trained and dequantised, then merged, so the merged weights are
# dequant(Q(W)) + ΔW, the trained model's own; bitdelta: the base + α·sign(Δ); full: final/ is the model;
# prompt/prefix: nothing to merge (their virtual tokens are inputs, not weights).


def check_mergeable(cfg: DictConfig, what: str) -> None:
    if not ADAPTERS[cfg.adapter.name].mergeable:
        raise UsageError(f"{what}: adapter={cfg.adapter.name} cannot be merged into the weights (its virtual tokens "
                         f"are extra inputs, not a weight update): run it with `alignkit generate run=RUN`, which "
                         f"feeds them")


def merged_model(run_dir: Path, cfg: DictConfig, head: str, four_bit: bool = True):
    """(fp32 model with the run's adapter merged, on the CPU, in eval mode; tokenizer). head: "lm" | "score".
    four_bit=False: a 4-bit run's adapter merged into the original full-precision base instead (what the
    model would be without the quantisation it was trained on)."""
    from peft import PeftModel

    check_mergeable(cfg, f"merging {run_dir}")
    cpu, final = torch.device("cpu"), Path(run_dir) / "final"
    adapter = ADAPTERS[cfg.adapter.name]
    fp32 = {"dtype": "float32"}
    if adapter.final == "bitdelta":
        model, tokenizer, _ = load_base_model(OmegaConf.merge(base_model_cfg(cfg), fp32), cpu, head)
        model = apply(model, final)
    elif adapter.trains_base:
        model, tokenizer, _ = load_base_model(OmegaConf.merge(cfg.model, {"path": str(final)}, fp32), cpu, head)
    else:
        quantized = adapter.four_bit and four_bit
        adapter_cfg = OmegaConf.merge(cfg.adapter, {"compute_dtype": "float32"}) if quantized else cfg.adapter
        options = base_load_options(adapter_cfg, cpu) if quantized else {}  # the base as trained: 4-bit again
        model, tokenizer, _ = load_base_model(OmegaConf.merge(base_model_cfg(cfg), fp32), cpu, head, **options)
        if quantized:
            model = model.dequantize(dtype=torch.float32)
        model = PeftModel.from_pretrained(model, str(final)).merge_and_unload()
    model.config.use_cache = True  # load_base_model turns the cache off for training
    return model.float().eval(), tokenizer
