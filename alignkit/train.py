"""`alignkit train`: load the base, attach the adapter, run the method's loop in one session, save final/.

What differs between methods comes from their records (alignkit.methods) and adapters' records; this file
names none. Under torchrun every process runs it; rank 0 alone writes the run dir (session/dist.py).
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from omegaconf import DictConfig, OmegaConf

from .adapters import ADAPTERS, attach_adapter, base_load_options
from .bitdelta.pipeline import compress_trained
from .data.split import HELD_OUT, held_out_places, record, split_items
from .errors import io_error
from .forward.policy import add_value_head
from .io import atomic_json, atomic_text
from .methods import method_record
from .methods.record import Method, Online
from .models.load import disable_dropout, load_base_model, resolve_model_dir
from .runs.read import base_model_cfg
from .runs.reward import make_reward, reward_run
from .session import dist, startup
from .session.batches import model_input_batches, plan_steps, seed_everything
from .session.checkpoint import save_final
from .session.events import require_tensorboard, write_events
from .session.loops import offline_loop, online_loop
from .session.progress import print_table
from .session.resources import return_freed_memory
from .session.rundir import preflight, replacing
from .session.session import Session


def count_params(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


@dataclass
class Run:
    """Everything a method needs, built by prepare_run."""
    cfg: DictConfig
    method: Method
    run_dir: Path
    device: torch.device
    model: object
    tokenizer: object
    model_dir: str
    train_examples: list
    eval_examples: list
    collate: Callable | None  # None for online methods, which make their own batches
    step_fn: Callable         # the method's step with its config bound: (model, batch, denominator)
    held_out: dict            # heldout.json: which raw rows were held out
    reward_fn: Callable | None = None  # online: (rows, texts, completion ids) -> scores; default from cfg.reward
    reference: object = None  # a frozen copy of the base as the reference (adapter=full), loaded by before_training


def prepare_run(cfg: DictConfig, rows: list | None = None) -> Run:
    """Check the run dir and data, load the base, attach the adapter; write nothing yet.

    rows: what preflight(cfg) returned, when the caller ran it already (the CLI does, before the heavy imports)."""
    rows = preflight(cfg) if rows is None else rows  # bad data fails before the model loads
    method = method_record(cfg.method.name)
    if os.environ.get("ALIGNKIT_RETURN_MEMORY") == "1":
        return_freed_memory()  # peak RSS = what is alive, at the cost of speed (see resources.py)
    if cfg.run.tensorboard:
        require_tensorboard()
    seed_everything(cfg.train.seed)
    device = dist.setup()
    head = "score" if method.head == "score" else "lm"
    # with policy.init that run's policy becomes the base: the reference (adapters off) is then that policy
    dist.main_first(lambda: resolve_model_dir(base_model_cfg(cfg).path))  # one process fills the model cache
    sharded = cfg.train.strategy.value == "fsdp" and dist.distributed()
    model, tokenizer, model_dir = load_base_model(base_model_cfg(cfg), device, head,
                                                  **base_load_options(cfg.adapter, device, sharded))
    startup.mark("model_load")
    if method.online and cfg.reward.kind.value == "model":
        reward_run(cfg, tokenizer)  # a wrong reward.run fails now, before anything is written
    functions = method.online and cfg.reward.kind.value == "functions"  # an import that fails, fails now too
    reward_fn = make_reward(cfg, None, tokenizer, None) if functions else None
    examples, collate = method.prepare(cfg, tokenizer, rows)
    held = held_out_places(len(rows), cfg.data.eval_fraction, cfg.train.seed)  # over the raw rows
    train_examples, eval_examples = split_items(examples, held, place=lambda i, e: e["source"])
    if method.check_data is not None:
        method.check_data(cfg, train_examples)
    startup.mark("tokenise")
    if cfg.train.disable_dropout:
        disable_dropout(model)
    seed_everything(cfg.train.seed)  # adapter init must not depend on what loading consumed
    model = attach_adapter(model, cfg.adapter, cfg.train, "SEQ_CLS" if head == "score" else "CAUSAL_LM")
    data_init = ADAPTERS[cfg.adapter.name].data_init
    if data_init is not None:  # e.g. LoRA's init=eva: A from the activations of the training batches
        data_init(model, cfg.adapter, partial(model_input_batches, train_examples, collate, tokenizer.pad_token_id,
                                              cfg.train))
    if method.head == "lm+value":
        add_value_head(model, device)
    startup.mark("adapter")
    return Run(cfg, method, Path(cfg.run.dir), device, model, tokenizer, model_dir, train_examples, eval_examples,
               collate, partial(method.step, method=cfg.method), record(rows, held, cfg.data.eval_fraction,
                                                                        cfg.train.seed), reward_fn)


def execute(run: Run, started: float | None = None) -> dict:
    """Train, save final/, write summary.json last. started: perf_counter() at launch, for wall time.

    With run.overwrite=true an earlier run in run.dir is kept aside until summary.json is written."""
    with replacing(run.run_dir, run.cfg.run.overwrite and dist.is_main()):
        return _execute(run, time.perf_counter() if started is None else started)


def _execute(run: Run, started: float) -> dict:
    cfg, run_dir, model, method = run.cfg, run.run_dir, run.model, run.method
    dist.barrier()  # every process has checked run.dir (preflight) before rank 0 writes in it
    if dist.is_main():
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise io_error(exc, run_dir) or exc
        atomic_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg))
        atomic_json(run_dir / HELD_OUT, run.held_out)
    if method.before_training is not None:
        method.before_training(run)
    per_epoch, total = plan_steps(len(run.train_examples), cfg.train, dist.world(), accumulate=not method.online)
    announce(run, per_epoch, total)
    forward = dist.wrap(model, run.step_fn, cfg.train.strategy.value, run.device)
    session = Session(cfg, model, run_dir, run.device, per_epoch, total, method.updates_per_step(cfg.method),
                      method.state(cfg.method) if method.state else None)
    if method.online:
        reward = run.reward_fn or make_reward(cfg, model, run.tokenizer, run.model_dir)
        ctx = Online(cfg, model, run.tokenizer, run.device, forward, reward, session.state,
                     reference=run.reference, prompts=run.train_examples)
        final = online_loop(session, method, ctx, run.train_examples)
    else:
        final = offline_loop(session, forward, run.train_examples, run.eval_examples, run.collate)
    final.update(save_result(run))
    trainable, total_params = count_params(model)
    summary = {**final, "trainable_params": trainable, "total_params": total_params, "device": run.device.type,
               "processes": dist.world(), "strategy": cfg.train.strategy.value if dist.distributed() else None,
               "base_model": run.model_dir, "wall_seconds": time.perf_counter() - started,
               "run_dir": str(run_dir), "startup": startup.record()}
    if dist.is_main():
        if cfg.run.tensorboard:
            write_events(run_dir)
        atomic_json(run_dir / "summary.json", summary)
    return summary


def announce(run: Run, per_epoch: int, total: int) -> None:
    """The run's first line: what trains on what, how much of it, for how long, and where it goes."""
    cfg, t = run.cfg, run.cfg.train
    trainable, count = count_params(run.model)
    start = f" from policy.init={cfg.policy.init}" if cfg.policy.init is not None else ""
    processes = f" x {dist.world()} processes ({t.strategy.value})" if dist.world() > 1 else ""
    length = f"{total} steps = {total / max(per_epoch, 1):.3g} epochs"
    if t.max_steps > 0 and total != per_epoch * t.epochs:
        length += f" (train.max_steps={t.max_steps} overrides train.epochs={t.epochs}; train.max_steps=-1 runs epochs)"
    if dist.is_main():
        print(f"alignkit: {cfg.method.name} + {cfg.adapter.name} on {cfg.model.path}{start} ({run.device.type}"
              f"{processes}), {trainable:,} of {count:,} parameters trainable, {len(run.train_examples)} train / "
              f"{len(run.eval_examples)} eval rows, {length} -> {run.run_dir}", file=sys.stderr)


def save_result(run: Run) -> dict:
    """final/: the trained model (a peft adapter dir or a full model dir, plus the tokenizer and the method's
    extra files), or, for an adapter whose final/ is a BitDelta artifact, that artifact of the trained model
    over its base (rank 0 only: every DDP process holds the same model; FSDP is refused)."""
    if ADAPTERS[run.cfg.adapter.name].final == "bitdelta":
        return compress_trained(run) if dist.is_main() else {}
    if hasattr(run.model, "peft_config"):
        run.model.peft_config["default"].base_model_name_or_path = run.model_dir
    state = dist.gathered_state(run.model)  # FSDP: every process sends its shards to rank 0
    if dist.is_main():
        save_final(run.run_dir / "final", run.model, run.tokenizer, run.method.finish, state)
    return {}


def startup_line(record: dict) -> str:
    """'12.3 (config 1.1, read_data 0.1, ...)': seconds to the first step and what they were spent on."""
    parts = ", ".join(f"{p} {record[f'{p}_s']:.1f}" for p in startup.PHASES[:-1] if f"{p}_s" in record)
    return f"{record['to_first_step_s']:.1f} ({parts})"


def run_train(cfg: DictConfig, rows: list | None = None) -> dict:
    started = time.perf_counter()
    summary = execute(prepare_run(cfg, rows), started)
    if dist.is_main():
        shown = {k: v for k, v in summary.items() if k not in ("run_dir", "startup")}
        if "to_first_step_s" in summary["startup"]:
            shown["to_first_step_s"] = startup_line(summary["startup"])
        print_table(f"run: {summary['run_dir']}", shown)
    return summary
