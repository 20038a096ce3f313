"""A finished run as one plain transformers model with its adapter merged into the weights.

Used by `alignkit export` and by policy.init (a merged policy as the next run's base). Merging is why
the LoRA family has no inference latency: W <- W + ΔW once, then the model is the base architecture.

- peft adapters (LoRA and its variants, VeRA, LoHa, LoKr, IA³): the base in fp32 + final/, peft's
  merge_and_unload. A reward model keeps its score head (peft's modules_to_save copy).
- a 4-bit base (qlora): loaded as it was trained, dequantised to fp32 (transformers), then the adapter
  merged: the merged weights are dequant(Q(W)) + ΔW, the trained model's own weights.
- bitdelta: the base + α·sign(Δ) (alignkit.bitdelta.apply); full: final/ is the model.
- prompt/prefix: nothing to merge (their virtual tokens are inputs, not weights): refused.
"""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ..adapters import ADAPTERS, base_load_options
from ..errors import UsageError
from ..models.load import load_base_model


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

    from ..bitdelta.apply import apply
    from .read import base_model_cfg

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
