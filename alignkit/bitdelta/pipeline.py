"""`alignkit compress base=PATH finetuned=PATH`, and the last step of `alignkit train adapter=bitdelta`.

Both hold two models at most: the base (which becomes the compressed model in place) and the
fine-tuned one (the teacher). Steps: measure the base, binarize, measure, distil the scales, merge
them into the base exactly as `apply` does and measure again; write final/ (the artifact + the
tokenizer) and compress.json (the report).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .. import __version__
from ..data.load import load_rows
from ..data.split import HELD_OUT, held_out_rows
from ..data.tasks import TASKS
from ..data.tokenize import encode_row
from ..errors import UsageError
from ..adapters import base_load_options
from ..io import atomic_dir, atomic_json
from ..methods import method_record
from ..models.blocks import block_linears
from ..models.load import load_base_model, pick_device, resolve_model_dir
from ..runs.read import base_model_cfg
from ..session.batches import seed_everything
from ..session.rundir import check_run_dir, replacing
from .apply import merge
from .artifact import save_artifact
from .compress import base_fingerprint, binarize, check_same_shapes, make_student
from .distill import calibration_stream, distill_scales
from .fidelity import batches, fidelity, gold_score, sequences
from .linear import unwrap_linears
from .report import print_report, size_report, summary_metrics


def split_data(cfg: DictConfig, tokenizer, rows, run_dir: Path | None = None) -> tuple[list, list, list]:
    """(calibration sequences, held-out sequences, held-out rows): the rows the training run `run_dir`
    recorded as held out, else the seeded split of the raw rows `alignkit train` makes with the same data,
    train.seed and data.eval_fraction, so held-out means unseen."""
    held_places = set(held_out_rows(rows, cfg.data.eval_fraction, cfg.train.seed, run_dir))
    kind = method_record(cfg.method.name).data
    kind = kind if kind in ("preference", "unpaired") else "sft"
    train, held = [], []
    for place, (where, row) in enumerate(rows):
        examples = encode_row(tokenizer, where, row, cfg.data, kind)
        if examples:
            (held if place in held_places else train).append((row, examples))
    if not train and not held:
        raise UsageError(f"data: no row fits in data.max_length={cfg.data.max_length}")
    return (sequences([e for _, es in train for e in es]), sequences([e for _, es in held for e in es]),
            [r for r, _ in held])


def training_run(cfg: DictConfig) -> Path | None:
    """The alignkit run dir the fine-tuned model comes from (finetuned=RUN/final) when it recorded its held-out
    rows and was trained on the same data.* and train.seed: compress then measures on exactly those rows."""
    for candidate in (Path(cfg.adapter.finetuned), Path(cfg.adapter.finetuned).parent):
        if (candidate / HELD_OUT).exists() and (candidate / "config.yaml").exists():
            saved = OmegaConf.load(candidate / "config.yaml")
            same = OmegaConf.to_container(saved.data) == OmegaConf.to_container(cfg.data) and \
                saved.train.seed == cfg.train.seed
            return candidate if same else None
    return None


def compress_models(cfg: DictConfig, base, finetuned, tokenizer, data: tuple, device) -> tuple:
    """BitDelta of finetuned over base -> (Delta with distilled scales, report without sizes).
    base ends up as the compressed model (W_base + α·S merged, extras copied in)."""
    calibration, held, held_rows = data
    a, t, precision = cfg.adapter, cfg.train, cfg.train.precision.value
    check_same_shapes(base, finetuned)
    delta = binarize(base, finetuned, block_linears(base))
    fingerprint = base_fingerprint(base)
    eval_batches = batches(held or calibration, t.eval_batch_size, tokenizer.pad_token_id)
    judge = TASKS[cfg.data.task][1] if cfg.data.task in TASKS and held_rows else None
    sample = OmegaConf.merge(cfg.sample, {"max_new_tokens": a.gold_max_new_tokens})

    def measure(model) -> dict:
        out = fidelity(finetuned, model, eval_batches, device, precision)
        out["gold"] = gold_score(model, tokenizer, held_rows, judge, sample, device) if judge else None
        return out

    fid = {"text": "held-out rows" if held else "calibration rows (data.eval_fraction=0)",
           "task": cfg.data.task if judge else None, "gold_rows": len(held_rows) if judge else 0}
    fid["base"], fid["finetuned"] = measure(base), measure(finetuned)
    layers = make_student(base, delta)
    fid["initial"] = measure(base)
    started = time.perf_counter()
    stream = calibration_stream(calibration, t.batch_size, tokenizer.pad_token_id, t.seed)
    losses = distill_scales(finetuned, base, stream, a.distill_steps, a.lr, a.distill_loss.value, device, precision)
    seconds = time.perf_counter() - started
    for name, layer in layers.items():
        delta.scales[name] = layer.scales["student"].detach().float().cpu()
    unwrap_linears(base)
    merge(base, delta)  # measure exactly what apply() gives a user
    fid["distilled"] = measure(base)
    gold_ft = fid["finetuned"]["gold"]
    for model in ("base", "initial", "distilled"):  # kept share of the fine-tuned model's gold score
        fid[model]["gold_vs_finetuned"] = fid[model]["gold"] / gold_ft if judge and gold_ft else None
    report = {"base_sha256": fingerprint, "fidelity": fid,
              "distill": {"steps": a.distill_steps, "loss": a.distill_loss.value, "lr": a.lr,
                          "calibration_sequences": len(calibration), "loss_first": losses[0] if losses else None,
                          "loss_last": losses[-1] if losses else None, "seconds": seconds}}
    return delta, report


def write_outputs(run_dir: Path, delta, report: dict, tokenizer, info: dict, started: float) -> dict:
    """final/ = artifact + tokenizer (atomically), then compress.json with the sizes (last).
    started: perf_counter() when the compression began, for wall_seconds."""
    def write(tmp: Path) -> None:
        save_artifact(tmp, delta, {**info, "base_sha256": report["base_sha256"]})
        tokenizer.save_pretrained(tmp)

    atomic_dir(run_dir / "final", write)
    report = {**info, "artifact": str(run_dir / "final"), **report, "size": size_report(run_dir / "final", delta),
              "wall_seconds": time.perf_counter() - started}
    atomic_json(run_dir / "compress.json", report)
    return report


def _info(cfg: DictConfig, base_dir: str, finetuned: str, dtype) -> dict:
    return {"base_model": cfg.model.path, "base_dir": base_dir, "finetuned_model": finetuned,
            "dtype": str(dtype).removeprefix("torch."), "distill_steps": cfg.adapter.distill_steps,
            "alignkit_version": __version__}


def _resolve(role: str, path: str) -> None:
    try:
        resolve_model_dir(path)
    except UsageError as exc:
        raise UsageError(f"{role}: {str(exc).removeprefix('model.path: ')}") from None


def run_compress(cfg: DictConfig) -> dict:
    """`alignkit compress`: base = model.path, fine-tuned = adapter.finetuned; writes run.dir."""
    started = time.perf_counter()
    run_dir = check_run_dir(cfg)
    seed_everything(cfg.train.seed)
    rows = load_rows(cfg.data, cfg.train.seed)
    _resolve("base", cfg.model.path)
    _resolve("finetuned", cfg.adapter.finetuned)
    device = pick_device()
    options = base_load_options(cfg.adapter, device)
    base, _, base_dir = load_base_model(cfg.model, device, **options)
    finetuned_cfg = OmegaConf.merge(cfg.model, {"path": cfg.adapter.finetuned})
    finetuned, tokenizer, _ = load_base_model(finetuned_cfg, device, **options)
    check_same_shapes(base, finetuned)
    data = split_data(cfg, tokenizer, rows, training_run(cfg))
    print(f"alignkit: compress {cfg.adapter.finetuned} over {cfg.model.path} ({device.type}), "
          f"{len(data[0])} calibration / {len(data[1])} held-out sequences -> {run_dir}", file=sys.stderr)
    delta, report = compress_models(cfg, base, finetuned, tokenizer, data, device)
    del finetuned
    info = _info(cfg, base_dir, cfg.adapter.finetuned, next(base.parameters()).dtype)
    with replacing(run_dir, cfg.run.overwrite):  # run.overwrite=true: the old run goes once this one is written
        run_dir.mkdir(parents=True, exist_ok=True)  # only now: a failed compress leaves no run dir behind
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
        report = write_outputs(run_dir, delta, report, tokenizer, info, started)
    print_report(report)
    return report


def compress_trained(run) -> dict:
    """`alignkit train adapter=bitdelta`, after training: the trained model over a fresh load of its
    base -> final/ (only the artifact) and compress.json; returns summary numbers."""
    cfg, started = run.cfg, time.perf_counter()
    data = split_data(cfg, run.tokenizer, load_rows(cfg.data, cfg.train.seed), run.run_dir)
    base, _, _ = load_base_model(base_model_cfg(cfg), run.device, **base_load_options(cfg.adapter, run.device))
    delta, report = compress_models(cfg, base, run.model, run.tokenizer, data, run.device)
    info = _info(cfg, run.model_dir, f"{run.run_dir} (trained)", next(base.parameters()).dtype)
    del base
    report = write_outputs(run.run_dir, delta, report, run.tokenizer, info, started)
    print_report(report)
    return summary_metrics(report)
