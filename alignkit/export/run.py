"""`alignkit export run=RUN [export.*]`: the run as a plain model with its adapter merged into the weights.

format=hf: a transformers model dir (safetensors, config, generation config, tokenizer) that
AutoModelForCausalLM (a reward model: AutoModelForSequenceClassification, score head included) loads
with no peft; PPO exports the policy (its value head only served training). format=gguf: one .gguf
file (export/gguf.py). The export is written to a temp dir, loaded back and compared with the run's
model as it trained (a qlora run: the 4-bit model) on held-out inputs, and renamed into place with
export.json, the report that is also printed: max_abs_diff_vs_run (export vs the trained model: logits,
or a reward model's scores), max_abs_diff_vs_merged_fp32 (what export.dtype or GGUF quantisation
costs), greedy_agreement_vs_run; a qlora run also gives max_abs_diff_full_precision_base_vs_run, the
same adapter merged into the original full-precision weights instead (what the 4-bit base changed).
"""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from ..adapters import ADAPTERS
from ..config.compose import check_overrides
from ..data.collate import pad_batch
from ..errors import UsageError
from ..forward.scores import last_token_scores
from ..io import atomic_dir, atomic_json
from ..methods import compose, method_record, saved_config
from ..models.load import DTYPES, disable_dropout, resolve_model_dir
from ..runs.read import base_model_cfg, check_mergeable, head_of, load_run, merged_model
from ..session.progress import print_table

CHECK_TEXTS = ["What is 7 * 6?", "Write one sentence about the sea."]  # when the run's data cannot be read


def parse_args(args: list[str]) -> tuple[Path, DictConfig]:
    runs = [a.split("=", 1)[1] for a in args if a.startswith("run=")]
    rest = [a for a in args if not a.startswith("run=")]
    if len(runs) != 1:
        raise UsageError("alignkit export needs run=RUN_DIR (one finished run)")
    flags = [a for a in rest if a.startswith("-")]
    if flags:
        raise UsageError(f"alignkit export takes no option {flags[0]} (only run=RUN_DIR and export.* keys)")
    check_overrides(rest, multirun=False)
    other = [a for a in rest if not a.lstrip("+~").startswith("export.")]
    if other:
        raise UsageError(f"alignkit export takes run=RUN_DIR and export.* keys, not '{other[0]}' (the run's own "
                         f"config says how it was trained)")
    export = compose(rest).export
    if export.check_rows < 1:
        raise UsageError(f"export.check_rows={export.check_rows} is out of range: must be >= 1")
    run_dir = Path(runs[0])
    if not (run_dir / "final").is_dir() or not (run_dir / "config.yaml").exists():
        raise UsageError(f"{run_dir} is not a finished alignkit run (no final/ or config.yaml)")
    return run_dir, export


def target_dir(run_dir: Path, export: DictConfig) -> Path:
    """export.dir, or RUN/export(-gguf); an existing non-empty dir only with export.overwrite=true."""
    fmt = export.format.value
    out = Path(export.dir) if export.dir is not None else run_dir / ("export" if fmt == "hf" else "export-gguf")
    if out.exists() and not out.is_dir():
        raise UsageError(f"export.dir {out} is a file, not a directory: pick another export.dir")
    if out.is_dir() and any(out.iterdir()) and not export.overwrite:
        raise UsageError(f"export.dir {out} already exists and is not empty: pick another export.dir or replace it "
                         f"with export.overwrite=true")
    return out


def export_dtype(export: DictConfig, cfg: DictConfig) -> torch.dtype:
    """export.dtype; auto = the dtype the base checkpoint (a full run: its final/) is stored in."""
    if export.dtype.value != "auto":
        return DTYPES[export.dtype.value]
    from transformers import AutoConfig

    trained_base = ADAPTERS[cfg.adapter.name].trains_base and ADAPTERS[cfg.adapter.name].final == "model"
    source = Path(cfg.run.dir) / "final" if trained_base else resolve_model_dir(base_model_cfg(cfg).path)
    stored = getattr(AutoConfig.from_pretrained(source, trust_remote_code=cfg.model.trust_remote_code), "dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    return stored if stored in DTYPES.values() else torch.float32


def check_inputs(cfg: DictConfig, tokenizer, n: int) -> dict:
    """n prompts of the run's data, held-out ones first (chat template applied), right-padded: input_ids,
    attention_mask."""
    from ..eval.run import held_out
    from ..generation.sample import prompt_ids

    try:
        train, held = held_out(cfg, Path(cfg.run.dir))
        prompts = [r["prompt"] for _, r in held + train if r.get("prompt") is not None][:n]
    except UsageError:  # the data moved since: any text serves to compare two models
        prompts = []
    encoded = [prompt_ids(tokenizer, p) for p in (prompts or CHECK_TEXTS[:n])]
    batch = pad_batch([{"input_ids": ids, "completion_mask": [1] * len(ids)} for ids in encoded],
                      tokenizer.pad_token_id)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def outputs(model, batch: dict, head: str) -> torch.Tensor:
    """Logits at the real positions (a reward model: its scores), fp32."""
    with torch.no_grad():
        if head == "score":
            return last_token_scores(model, batch).float()
        return model(**batch).logits[batch["attention_mask"].bool()].float()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.cpu() - b.cpu()).abs().max())


def as_trained(run_dir: Path) -> torch.nn.Module:
    """The run's model as training ran it: peft adapter unmerged, 4-bit base for qlora (train mode, no dropout:
    bitsandbytes' CPU kernel differs in eval mode)."""
    model, _, _ = load_run(run_dir, torch.device("cpu"))
    disable_dropout(model)
    return model.train()


def reload(out: Path, head: str, gguf_file: str | None):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForSequenceClassification if head == "score" else AutoModelForCausalLM
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    return cls.from_pretrained(out, dtype=torch.float32, **kwargs).eval()


def describe(cfg: DictConfig) -> str:
    a = cfg.adapter
    if "init" not in a:  # not of the LoRA family's options
        return a.name
    options = [k for k in ("use_dora", "use_rslora") if a[k]] + ([f"init={a.init}"] if a.init != "default" else [])
    return a.name + (f" ({', '.join(options)})" if options else "")


def run_export(args: list[str]) -> dict:
    run_dir, export = parse_args(args)
    cfg = saved_config(run_dir / "config.yaml")
    head = head_of(cfg)
    check_mergeable(cfg, "alignkit export")
    fmt = export.format.value
    if fmt == "gguf" and head != "lm":
        raise UsageError(f"export.format=gguf writes language models; {run_dir} is a method={cfg.method.name} run "
                         f"(a score head): export it with export.format=hf")
    out = target_dir(run_dir, export)
    cfg.run.dir = str(run_dir)  # where its final/ is now, wherever it was trained
    model, tokenizer = merged_model(run_dir, cfg, head)
    dtype = export_dtype(export, cfg)
    batch = check_inputs(cfg, tokenizer, export.check_rows)
    trained = outputs(as_trained(run_dir), batch, head)
    merged = outputs(model, batch, head)
    report = {"run": str(run_dir), "method": cfg.method.name, "adapter": describe(cfg), "format": fmt,
              "compared": "scores" if head == "score" else "logits", "check_rows": int(batch["input_ids"].shape[0]),
              "notes": []}
    if method_record(cfg.method.name).head == "lm+value":
        report["notes"].append("the policy only: its value head (final/value_head.safetensors) served training")
    if ADAPTERS[cfg.adapter.name].four_bit:  # what the 4-bit base costs: the same adapter on the original weights
        report["notes"].append("merged into the dequantised 4-bit base the adapter was trained on")
        original, _ = merged_model(run_dir, cfg, head, four_bit=False)
        report["max_abs_diff_full_precision_base_vs_run"] = max_diff(outputs(original, batch, head), trained)
        del original
    gguf_file = f"{run_dir.resolve().name}.{export.gguf_type.value}.gguf" if fmt == "gguf" else None

    def write(tmp: Path) -> None:
        if fmt == "gguf":
            from .gguf import write_gguf

            report["notes"] += write_gguf(model, tokenizer, tmp / gguf_file, export.gguf_type.value, run_dir.name)
            report.update(gguf_type=export.gguf_type.value, file=gguf_file)
        else:
            model.to(dtype).save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            report["dtype"] = str(dtype).removeprefix("torch.")
        report["size_mb"] = round(sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file()) / 2 ** 20, 2)
        exported = outputs(reload(tmp, head, gguf_file), batch, head)
        report["max_abs_diff_vs_run"] = max_diff(exported, trained)
        report["max_abs_diff_vs_merged_fp32"] = max_diff(exported, merged)
        if head == "lm":
            report["greedy_agreement_vs_run"] = float((exported.argmax(-1) == trained.argmax(-1)).float().mean())
        atomic_json(tmp / "export.json", report)

    atomic_dir(out, write)
    report["dir"] = str(out)
    print_table(f"export: {out}", {k: ("; ".join(v) if isinstance(v, list) else v) for k, v in report.items()
                                   if v != []})
    return report

