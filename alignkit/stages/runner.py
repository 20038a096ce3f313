"""`alignkit train`: load the base, attach the adapter, run the method's loop."""
from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from omegaconf import DictConfig, OmegaConf

from ..adapters import WEIGHT_ADAPTERS, attach_adapter
from ..data.load import load_rows, split_eval
from ..errors import UsageError
from ..models.load import load_base_model, pick_device
from . import dpo, sft
from .checkpoint import atomic_json, checkpoints, save_final
from .common import autocast, disable_dropout
from .loop import train_loop

STAGES = {"sft": sft.prepare, "dpo": dpo.prepare}


def check_run_dir(cfg: DictConfig) -> Path:
    """Refuse to write over an earlier run unless resuming it with the same config."""
    run_dir = Path(cfg.run.dir)
    if cfg.run.resume is False:
        if run_dir.exists() and any(run_dir.iterdir()):
            raise UsageError(f"run.dir {run_dir} already exists and is not empty: pick another run.dir, "
                             f"or resume it with run.resume=true")
        return run_dir
    if (run_dir / "summary.json").exists():
        raise UsageError(f"run {run_dir} already finished (summary.json exists); nothing to resume")
    saved = run_dir / "config.yaml"
    if saved.exists():
        # compare as YAML text round-trips (enums become plain strings); the run settings may differ
        old = OmegaConf.to_container(OmegaConf.load(saved))
        new = OmegaConf.to_container(OmegaConf.create(OmegaConf.to_yaml(cfg)))
        old["run"] = new["run"] = None
        if old != new:
            raise UsageError(f"run.resume: the config differs from the one {run_dir} was started with "
                             f"({saved}); resume with the same overrides")
    if cfg.run.resume is True and not checkpoints(run_dir):
        print(f"alignkit: no checkpoint in {run_dir}; starting from step 0", file=sys.stderr)
    return run_dir


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def count_params(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


@dataclass
class Run:
    """Everything a stage needs, built by prepare_run."""
    cfg: DictConfig
    run_dir: Path
    device: torch.device
    model: object
    tokenizer: object
    model_dir: str
    train_examples: list
    eval_examples: list
    collate: Callable
    step_fn: Callable


def prepare_run(cfg: DictConfig) -> Run:
    """Check the run dir and data, load the base, attach the adapter; write nothing yet."""
    if cfg.data.path is not None:
        cfg.data.task = None  # data.path wins over the default built-in task
    run_dir = check_run_dir(cfg)
    seed_everything(cfg.train.seed)
    rows = load_rows(cfg.data, cfg.train.seed)  # bad data fails before the model loads
    device = pick_device()
    model, tokenizer, model_dir = load_base_model(cfg.model, cfg.adapter, device)
    examples, collate, step_fn = STAGES[cfg.method.name](cfg, tokenizer, rows)
    train_examples, eval_examples = split_eval(examples, cfg.data.eval_fraction, cfg.train.seed)
    if cfg.train.disable_dropout:
        disable_dropout(model)
    seed_everything(cfg.train.seed)  # adapter init must not depend on what loading consumed
    model = attach_adapter(model, cfg.adapter, cfg.train)
    if cfg.method.name == "dpo" and cfg.adapter.name in WEIGHT_ADAPTERS:
        # nothing to disable for a reference: take its log-probs once, before training
        with autocast(cfg.train.precision.value, device):
            dpo.precompute_reference(model, examples, collate, cfg.train.eval_batch_size, device)
    return Run(cfg, run_dir, device, model, tokenizer, model_dir, train_examples, eval_examples, collate, step_fn)


def execute(run: Run, started: float | None = None) -> dict:
    """Train, save final/, write summary.json last. started: perf_counter() at launch, for wall time."""
    started = time.perf_counter() if started is None else started
    cfg, run_dir, model = run.cfg, run.run_dir, run.model
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    trainable, total = count_params(model)
    print(f"alignkit: {cfg.method.name} + {cfg.adapter.name} on {cfg.model.path} ({run.device.type}), "
          f"{trainable:,} of {total:,} parameters trainable, {len(run.train_examples)} train / "
          f"{len(run.eval_examples)} eval rows -> {run_dir}", file=sys.stderr)
    final = train_loop(cfg, model, run.train_examples, run.eval_examples, run.collate, run.step_fn, run_dir,
                       run.device)
    final.update(FINISH.get(cfg.adapter.name, save_model)(run))
    summary = {**final, "trainable_params": trainable, "total_params": total, "device": run.device.type,
               "base_model": run.model_dir, "wall_seconds": time.perf_counter() - started,
               "run_dir": str(run_dir)}
    atomic_json(run_dir / "summary.json", summary)
    return summary


def save_model(run: Run) -> dict:
    """final/: the peft adapter dir or the full model dir, plus the tokenizer."""
    if hasattr(run.model, "peft_config"):
        run.model.peft_config["default"].base_model_name_or_path = run.model_dir
    save_final(run.run_dir / "final", run.model, run.tokenizer)
    return {}


def save_bitdelta(run: Run) -> dict:
    """final/: only the BitDelta artifact of the trained model over its base (+ compress.json)."""
    from ..bitdelta.pipeline import compress_trained

    return compress_trained(run)


# adapters whose final/ is not the trained model as it is
FINISH = {"bitdelta": save_bitdelta}


def run_train(cfg: DictConfig) -> dict:
    started = time.perf_counter()
    summary = execute(prepare_run(cfg), started)
    print_summary(summary)
    return summary


def print_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"run: {summary['run_dir']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        if key != "run_dir":
            table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    Console().print(table)
