"""Load a base model: built-in name, local dir, .gguf file or hub id; dtype; 4-bit."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from omegaconf import DictConfig
from safetensors import SafetensorError

from ..errors import UsageError
from .cache import cached, fetch_smollm2, gguf_entry
from .hub import hub_offline, offline_hint
from .tiny import save_tiny

BUILTIN = {
    "alignkit:tiny": ("tiny", save_tiny),
    "alignkit:smollm2-135m-instruct": ("smollm2-135m-instruct", fetch_smollm2),
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device() -> torch.device:
    """The GPU (under torchrun: this process's, cuda:LOCAL_RANK) or the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


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
        raise UsageError(f"model.path: no such file or directory: {local} (give a model dir, a .gguf file or a "
                         f"hub id)")
    return path  # a hub id


PICKLE_HINT = (" (only safetensors weights are loaded; model.allow_pickle=true also loads pickled *.bin "
               "weights, which can run code when loaded: only for a source you trust)")


def check_pickle(source: str, allow_pickle: bool) -> None:
    """A local model dir whose weights are only pickles (*.bin, *.pt, *.pth) is refused unless allowed."""
    folder = Path(source)
    if allow_pickle or not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickled = sorted(p for pattern in ("*.bin", "*.pt", "*.pth") for p in folder.glob(pattern))
    if pickled:
        raise UsageError(f"model.path: {pickled[0]} is a pickled weights file, which can run code when loaded: "
                         f"convert it to safetensors, or set model.allow_pickle=true if you trust its source")


def load_base_model(model_cfg: DictConfig, device: torch.device, head: str = "lm", quantization=None,
                    full_weights: bool = False):
    """Return (model, tokenizer, model_dir).

    head: "lm" -> a causal LM; "score" -> a scalar score head (sequence classification, 1 label)
    on the same body, freshly initialised N(0, 1/sqrt(d+1)) unless the checkpoint has one.
    quantization: a BitsAndBytesConfig (4-bit base), or None. full_weights: the base weights train (fp32 master
    weights under model.dtype=auto). adapters.base_load_options(adapter cfg, ...) gives both for an adapter.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()  # the load report lists the head swap as missing/unexpected keys
    source = resolve_model_dir(model_cfg.path)
    check_pickle(source, model_cfg.allow_pickle)
    hub = not Path(source).is_dir()
    kwargs = dict(trust_remote_code=model_cfg.trust_remote_code, local_files_only=hub and hub_offline(),
                  # True: transformers itself refuses pickles (a hub id's files are not listed here)
                  use_safetensors=None if model_cfg.allow_pickle else True,
                  dtype=resolve_dtype(model_cfg.dtype.value, device, full_weights=full_weights))
    if quantization is not None:
        kwargs.update(quantization_config=quantization, device_map={"": str(device)})
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=model_cfg.trust_remote_code,
                                                  local_files_only=kwargs["local_files_only"])
        if head == "score":
            model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=1, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as exc:
        hint = PICKLE_HINT if not model_cfg.allow_pickle and "safetensors" in str(exc) else ""
        if hub and kwargs["local_files_only"]:
            raise UsageError(f"cannot load model '{model_cfg.path}'{offline_hint(model_cfg.path)}") from exc
        raise UsageError(f"cannot load model '{model_cfg.path}': {str(exc).splitlines()[0]}{hint}") from exc
    except SafetensorError as exc:
        raise UsageError(f"model.path: the safetensors weights in {source} are corrupt or truncated "
                         f"({str(exc).splitlines()[0]}): download or export the model again") from exc
    if quantization is None:
        model.to(device)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # batches carry explicit masks; pad id is never a mask
    if head == "score":
        model.config.pad_token_id = tokenizer.pad_token_id
        init_score_head(model, source)
    model.config.use_cache = False
    return model, tokenizer, source


def init_score_head(model, source: str) -> None:
    """N(0, 1/sqrt(d+1)) as lm-human-preferences; HF's default (std 0.02) gives near-zero scores."""
    from safetensors import safe_open

    files = list(Path(source).glob("*.safetensors")) if Path(source).is_dir() else []
    for f in files:
        with safe_open(str(f), "pt") as sf:
            if any(k.startswith("score.") for k in sf.keys()):
                return  # a trained reward model: keep its head
    with torch.no_grad():
        d = model.score.weight.shape[1]
        model.score.weight.normal_(0.0, 1.0 / (d + 1) ** 0.5)
        if model.score.bias is not None:
            model.score.bias.zero_()


def disable_dropout(model) -> None:
    """Dropout off everywhere (train.disable_dropout): log-ratios against a reference are noisy otherwise."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    if hasattr(model.config, "attention_dropout"):
        model.config.attention_dropout = 0.0
