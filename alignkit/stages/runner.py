"""`alignkit train`: load the base, attach the adapter, run the method's loop.

Under torchrun every process runs this; rank 0 alone writes the run dir (dist.py).
"""
from __future__ import annotations

import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from omegaconf import DictConfig, OmegaConf

from ..adapters import attach_adapter
from ..data.split import HELD_OUT, held_out_places, record, split_items
from ..errors import io_error
from ..models.load import base_model_cfg, load_base_model, resolve_model_dir
from ..config.rules import HEAD
from . import dist, dpo, ppo, rm, sft
from .ppo_reward import make_reward, reward_run
from .rundir import preflight, replacing
from .checkpoint import atomic_json, atomic_text, save_final
from .common import disable_dropout
from .events import require_tensorboard, write_events
from .loop import plan_steps, train_loop
from .progress import print_table
from .resources import return_freed_memory

STAGES = {"sft": sft.prepare, "dpo": dpo.prepare, "rm": rm.prepare, "ppo": ppo.prepare}


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
    collate: Callable | None  # None for ppo, which makes its own batches
    step_fn: Callable | None
    held_out: dict  # heldout.json: which raw rows were held out
    reward_fn: Callable | None = None  # ppo: (rows, texts) -> scores; default from cfg.reward


def prepare_run(cfg: DictConfig, rows: list | None = None) -> Run:
    """Check the run dir and data, load the base, attach the adapter; write nothing yet.

    rows: what preflight(cfg) returned, when the caller ran it already (the CLI does, before the heavy imports)."""
    rows = preflight(cfg) if rows is None else rows  # bad data fails before the model loads
    run_dir = Path(cfg.run.dir)
    if os.environ.get("ALIGNKIT_RETURN_MEMORY") == "1":
        return_freed_memory()  # peak RSS = what is alive, at the cost of speed (see resources.py)
    if cfg.run.tensorboard:
        require_tensorboard()
    seed_everything(cfg.train.seed)
    device = dist.setup()
    head = HEAD.get(cfg.method.name, "lm")
    # with policy.init the SFT policy becomes the base: the reference (adapters off) is then the SFT model
    dist.main_first(lambda: resolve_model_dir(base_model_cfg(cfg).path))  # one process fills the model cache
    sharded = cfg.train.strategy.value == "fsdp" and dist.distributed()
    model, tokenizer, model_dir = load_base_model(base_model_cfg(cfg), cfg.adapter, device, head, sharded)
    if cfg.method.name == "ppo" and cfg.reward.kind == "model":
        reward_run(cfg, tokenizer)  # a wrong reward.run fails now, before anything is written
    examples, collate, step_fn = STAGES[cfg.method.name](cfg, tokenizer, rows)
    held = held_out_places(len(rows), cfg.data.eval_fraction, cfg.train.seed)  # over the raw rows
    train_examples, eval_examples = split_items(examples, held, place=lambda i, e: e["source"])
    if cfg.train.disable_dropout:
        disable_dropout(model)
    seed_everything(cfg.train.seed)  # adapter init must not depend on what loading consumed
    model = attach_adapter(model, cfg.adapter, cfg.train, "SEQ_CLS" if head == "score" else "CAUSAL_LM")
    return Run(cfg, run_dir, device, model, tokenizer, model_dir, train_examples, eval_examples, collate, step_fn,
               record(rows, held, cfg.data.eval_fraction, cfg.train.seed))


def execute(run: Run, started: float | None = None) -> dict:
    """Train, save final/, write summary.json last. started: perf_counter() at launch, for wall time.

    With run.overwrite=true an earlier run in run.dir is kept aside until summary.json is written."""
    with replacing(run.run_dir, run.cfg.run.overwrite and dist.is_main()):
        return _execute(run, time.perf_counter() if started is None else started)


def _execute(run: Run, started: float) -> dict:
    cfg, run_dir, model = run.cfg, run.run_dir, run.model
    dist.barrier()  # every process has checked run.dir (preflight) before rank 0 writes in it
    if dist.is_main():
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise io_error(exc, run_dir) or exc
        atomic_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg))
        atomic_json(run_dir / HELD_OUT, run.held_out)
    if cfg.method.name == "dpo" and dpo.needs_precomputed_reference(cfg):
        # one pass before training; no reference forward (or second model copy) while training;
        # rank 0 writes the cache, the other processes then read it
        dist.main_first(lambda: dpo.precompute_reference(
            model, run.train_examples + run.eval_examples, run.collate, cfg.train.eval_batch_size, run.device,
            cfg.train.precision.value, run_dir / "ref_logps.safetensors"))
    trainable, total = count_params(model)
    start = f" from policy.init={cfg.policy.init}" if cfg.policy.init is not None else ""
    processes = f" x {dist.world()} processes ({cfg.train.strategy.value})" if dist.world() > 1 else ""
    if dist.is_main():
        print(f"alignkit: {cfg.method.name} + {cfg.adapter.name} on {cfg.model.path}{start} ({run.device.type}"
              f"{processes}), {trainable:,} of {total:,} parameters trainable, {len(run.train_examples)} train / "
              f"{len(run.eval_examples)} eval rows, {steps_text(cfg, len(run.train_examples))} -> {run_dir}",
              file=sys.stderr)
    if cfg.method.name == "ppo":
        reward_fn = run.reward_fn or make_reward(cfg, model, run.tokenizer, run.model_dir)
        final = ppo.train_ppo(cfg, model, run.tokenizer, run.train_examples, reward_fn, run_dir, run.device)
    else:
        final = train_loop(cfg, model, run.train_examples, run.eval_examples, run.collate, run.step_fn, run_dir,
                           run.device)
    final.update(FINISH.get(cfg.adapter.name, save_model)(run))
    summary = {**final, "trainable_params": trainable, "total_params": total, "device": run.device.type,
               "processes": dist.world(), "strategy": cfg.train.strategy.value if dist.distributed() else None,
               "base_model": run.model_dir, "wall_seconds": time.perf_counter() - started,
               "run_dir": str(run_dir)}
    if dist.is_main():
        if cfg.run.tensorboard:
            write_events(run_dir)
        atomic_json(run_dir / "summary.json", summary)
    return summary


def steps_text(cfg: DictConfig, n_rows: int) -> str:
    """How long the run is: optimizer steps and epochs, and which key decided it (max_steps wins, as in HF)."""
    t = cfg.train
    per_epoch, total = plan_steps(n_rows, t, dist.world())
    epochs = total / max(per_epoch, 1)
    text = f"{total} steps = {epochs:.3g} epochs"
    if t.max_steps > 0 and total != per_epoch * t.epochs:
        text += f" (train.max_steps={t.max_steps} overrides train.epochs={t.epochs}; train.max_steps=-1 runs epochs)"
    return text


def save_model(run: Run) -> dict:
    """final/: the peft adapter dir or the full model dir, plus the tokenizer (and PPO's value head)."""
    if hasattr(run.model, "peft_config"):
        run.model.peft_config["default"].base_model_name_or_path = run.model_dir
    extra = ppo.save_value_head if run.cfg.method.name == "ppo" else None
    state = dist.gathered_state(run.model)  # FSDP: every process sends its shards to rank 0
    if dist.is_main():
        save_final(run.run_dir / "final", run.model, run.tokenizer, extra, state)
    return {}


def save_bitdelta(run: Run) -> dict:
    """final/: only the BitDelta artifact of the trained model over its base (+ compress.json).

    On rank 0 only (DDP: every process holds the same trained model; FSDP is refused)."""
    from ..bitdelta.pipeline import compress_trained

    return compress_trained(run) if dist.is_main() else {}


# adapters whose final/ is not the trained model as it is
FINISH = {"bitdelta": save_bitdelta}


def run_train(cfg: DictConfig, rows: list | None = None) -> dict:
    started = time.perf_counter()
    summary = execute(prepare_run(cfg, rows), started)
    if dist.is_main():
        print_table(f"run: {summary['run_dir']}", {k: v for k, v in summary.items() if k != "run_dir"})
    return summary
