"""Load a base model: built-in name, local dir, .gguf file or hub id; dtype; 4-bit."""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from ..adapters import WEIGHT_ADAPTERS
from ..errors import UsageError
from .cache import cached, fetch_smollm2, gguf_entry
from .tiny import save_tiny

BUILTIN = {
    "alignkit:tiny": ("tiny", save_tiny),
    "alignkit:smollm2-135m-instruct": ("smollm2-135m-instruct", fetch_smollm2),
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def gpu_has_bf16(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def resolve_dtype(name: str, device: torch.device, full_weights: bool = False) -> torch.dtype:
    """`auto`: fp32 on CPU and for full fine-tuning (fp32 master weights), else bf16 where the GPU has it."""
    if name != "auto":
        return DTYPES[name]
    if full_weights or not gpu_has_bf16(device):
        return torch.float32
    return torch.bfloat16


def resolve_model_dir(path: str) -> str:
    """Turn model.path into something from_pretrained takes: a local dir or a hub id."""
    if path in BUILTIN:
        name, build = BUILTIN[path]
        return str(cached(name, build))
    if path.startswith("alignkit:"):
        raise UsageError(f"unknown built-in model '{path}' (choose from {', '.join(BUILTIN)})")
    local = Path(path).expanduser()
    if local.suffix == ".gguf":
        if not local.is_file():
            raise UsageError(f"model.path: GGUF file not found: {local}")
        return str(gguf_entry(local))
    if local.is_dir():
        if not (local / "config.json").exists():
            raise UsageError(f"model.path: {local} is a directory without config.json, not a model")
        return str(local)
    if path.startswith((".", "/", "~")) or local.suffix:
        raise UsageError(f"model.path: no such file or directory: {local}")
    return path  # a hub id


def quantization_config(adapter: DictConfig, device: torch.device):
    from transformers import BitsAndBytesConfig

    compute = resolve_dtype(adapter.compute_dtype.value, device)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=adapter.quant_type,
        bnb_4bit_use_double_quant=adapter.double_quant,
        bnb_4bit_compute_dtype=compute,
    )


def load_base_model(model_cfg: DictConfig, adapter: DictConfig, device: torch.device):
    """Return (model, tokenizer, model_dir). 4-bit NF4 when adapter is qlora."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    source = resolve_model_dir(model_cfg.path)
    kwargs = dict(trust_remote_code=model_cfg.trust_remote_code,
                  dtype=resolve_dtype(model_cfg.dtype.value, device, full_weights=adapter.name in WEIGHT_ADAPTERS))
    if adapter.name == "qlora":
        kwargs.update(quantization_config=quantization_config(adapter, device), device_map={"": device.type})
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=model_cfg.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as exc:
        raise UsageError(f"cannot load model '{model_cfg.path}': {str(exc).splitlines()[0]}") from exc
    if adapter.name != "qlora":
        model.to(device)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # batches carry explicit masks; pad id is never a mask
    model.config.use_cache = False
    return model, tokenizer, source
