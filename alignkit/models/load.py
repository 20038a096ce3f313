"""Load a base model: built-in name, local dir, .gguf file or hub id; dtype; 4-bit."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from omegaconf import DictConfig
from safetensors import SafetensorError

from ..adapters import WEIGHT_ADAPTERS
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


def quantization_config(adapter: DictConfig, device: torch.device, sharded: bool = False):
    """sharded (FSDP): the 4-bit weights are stored in the compute dtype, a float FSDP can shard
    like the layers' other weights (bitsandbytes' FSDP-QLoRA setting); uint8 otherwise."""
    from transformers import BitsAndBytesConfig

    compute = resolve_dtype(adapter.compute_dtype.value, device)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=adapter.quant_type,
        bnb_4bit_use_double_quant=adapter.double_quant,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=compute if sharded else torch.uint8,
    )


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


def load_base_model(model_cfg: DictConfig, adapter: DictConfig, device: torch.device, head: str = "lm",
                    sharded: bool = False):
    """Return (model, tokenizer, model_dir). 4-bit NF4 when adapter is qlora (stored for FSDP when sharded).

    head: "lm" -> a causal LM; "score" -> a scalar score head (sequence classification, 1 label)
    on the same body, freshly initialised N(0, 1/sqrt(d+1)) unless the checkpoint has one.
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
                  dtype=resolve_dtype(model_cfg.dtype.value, device, full_weights=adapter.name in WEIGHT_ADAPTERS))
    if adapter.name == "qlora":
        kwargs.update(quantization_config=quantization_config(adapter, device, sharded), device_map={"": str(device)})
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
    if adapter.name != "qlora":
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


def load_run(run_dir, device: torch.device | None = None):
    """Load a finished run's final/ as its method trained it: (model in eval mode, tokenizer, cfg).

    lora/qlora: the base (4-bit again for qlora) + the peft adapter (with its score head for an RM);
    full: final/ is a complete model dir; bitdelta: the base with the 1-bit delta applied.
    """
    from omegaconf import OmegaConf

    from ..config.compose import load_saved_config
    from ..config.rules import HEAD

    run_dir = Path(run_dir)
    if not (run_dir / "final").is_dir() or not (run_dir / "config.yaml").exists():
        raise UsageError(f"{run_dir} is not a finished alignkit run (no final/ or config.yaml)")
    cfg = load_saved_config(run_dir / "config.yaml")
    device = device or pick_device()
    head = HEAD.get(cfg.method.name, "lm")
    final = run_dir / "final"
    if cfg.adapter.name == "full":
        model_cfg = OmegaConf.merge(cfg.model, {"path": str(final)})
        model, tokenizer, _ = load_base_model(model_cfg, cfg.adapter, device, head)
    elif cfg.adapter.name == "bitdelta":  # final/ is the 1-bit delta: base + alpha * sign
        from ..bitdelta.apply import apply

        model, tokenizer, _ = load_base_model(cfg.model, cfg.adapter, device, head)
        model = apply(model, final)
    else:
        from peft import PeftModel

        model, tokenizer, _ = load_base_model(base_model_cfg(cfg), cfg.adapter, device, head)
        model = PeftModel.from_pretrained(model, str(final))
    return model.eval(), tokenizer, cfg


def base_model_cfg(cfg: DictConfig) -> DictConfig:
    """The base a run trains on: model.*, or with policy.init that run's policy (so also the reference)."""
    from omegaconf import OmegaConf

    if cfg.policy.init is None:
        return cfg.model
    return OmegaConf.merge(cfg.model, {"path": policy_init_dir(cfg.policy.init)})


def policy_init_dir(init_run) -> str:
    """A model dir holding an SFT run's policy: its final/ (full) or base + LoRA merged once (cached).

    A LoRA trained on a 4-bit base (qlora) is merged into the full-precision base: a close
    approximation of the policy it was trained as.
    """
    from omegaconf import OmegaConf
    from peft import PeftModel

    from ..config.compose import load_saved_config
    from ..config.rules import HEAD
    from .cache import cached

    init_run = Path(init_run)
    final = init_run / "final"
    if not final.is_dir() or not (init_run / "config.yaml").exists():
        raise UsageError(f"policy.init: {init_run} is not a finished alignkit run (no final/ or config.yaml)")
    cfg = load_saved_config(init_run / "config.yaml")
    if HEAD.get(cfg.method.name, "lm") != "lm":
        raise UsageError(f"policy.init: {init_run} is a method={cfg.method.name} run, not a policy")
    if cfg.adapter.name == "full":
        return str(final)
    if cfg.adapter.name not in ("lora", "qlora"):
        raise UsageError(f"policy.init: cannot merge a {cfg.adapter.name} adapter into the base; "
                         f"start PPO from a lora, qlora or full run")
    stamp = max(p.stat().st_mtime_ns for p in final.iterdir())
    key = hashlib.sha256(f"{final.resolve()}|{stamp}".encode()).hexdigest()[:16]

    def build(out: Path) -> None:
        base, tokenizer, _ = load_base_model(OmegaConf.merge(base_model_cfg(cfg), {"dtype": "float32"}),
                                             OmegaConf.create({"name": "lora"}), torch.device("cpu"))
        merged = PeftModel.from_pretrained(base, str(final)).merge_and_unload()
        merged.save_pretrained(out)
        tokenizer.save_pretrained(out)

    return str(cached(f"policy-{init_run.name}-{key}", build))
