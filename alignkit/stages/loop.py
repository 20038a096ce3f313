"""The training loop every stage uses: explicit, top to bottom.

A stage gives `loss_fn(model, batch, denominator) -> (loss, stats)`: the loss
of one micro-batch already divided by the count (pairs or tokens) of the
whole accumulated step, and stats as sums over that micro-batch's units, so
k micro-batches of size b give exactly the numbers of one batch of k*b.

With several processes (dist.py) each runs loss_fn through the DDP/FSDP wrapper on its part of
every global micro-batch of batch_size x processes rows; the count is the global one, so
p processes of batch b give the numbers of one process of batch p*b.
"""
from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections import defaultdict
from pathlib import Path

import torch
from transformers import get_scheduler

from . import dist
from .checkpoint import load_checkpoint, prune_checkpoints, save_checkpoint
from .common import autocast, make_optimizer, to_device
from .faults import catch_sigint, count_step, is_finite, new_counts, stop_if_interrupted
from .progress import progress_bar
from .resources import peak_memory_mb
from .rundir import checkpoints, truncate_jsonl


def micro_batches(examples: list, batch_size: int, seed: int, epoch: int, shuffle: bool = True) -> list[list]:
    """The epoch's examples in a seeded order (or in order), cut into micro-batches."""
    g = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(len(examples), generator=g).tolist() if shuffle else list(range(len(examples)))
    return [[examples[i] for i in order[j:j + batch_size]] for j in range(0, len(order), batch_size)]


def plan_steps(n_examples: int, train, world: int = 1) -> tuple[int, int]:
    """(optimizer steps per epoch, total steps); a step takes batch_size x world x grad_accum rows."""
    per_epoch = math.ceil(math.ceil(n_examples / (train.batch_size * world)) / train.grad_accum)
    total = train.max_steps if train.max_steps > 0 else per_epoch * train.epochs
    return per_epoch, total


def step_windows(examples, train, per_epoch: int, start: int, total: int, rank: int = 0, world: int = 1):
    """Yield (step, epoch, micro-batches of that step) from `start` on; data position = f(step).

    A micro-batch is this process's (rows, real rows) share of a global one of batch_size x world rows.
    """
    cached_epoch, batches = None, None
    for step in range(start, total):
        epoch = step // per_epoch
        if epoch != cached_epoch:
            cached_epoch, batches = epoch, micro_batches(examples, train.batch_size * world, train.seed, epoch,
                                                         train.shuffle)
        i = (step % per_epoch) * train.grad_accum
        yield step, epoch, [dist.share(b, rank, world) for b in batches[i:i + train.grad_accum]]


def make_scaler(precision: str, device: torch.device):
    """fp16: a gradient scaler (small fp16 gradients underflow to 0 unscaled); None for fp32/bf16."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


def backward(loss: torch.Tensor, scaler) -> None:
    (scaler.scale(loss) if scaler is not None else loss).backward()


def run_batches(forward, micro: list, collate, precision: str, device, backward_pass: bool, scaler=None) -> dict:
    """forward(batch, global count) over this process's micro-batches, with backward for training;
    returns the global sums: loss, stats per unit, _tokens, _samples.

    The loss is scaled by the number of processes before backward (DDP and FSDP average the
    gradients, the global loss is their sum); a stand-in micro-batch (0 real rows) counts zero.
    """
    batches = [(to_device(collate(rows), device), real > 0) for rows, real in micro]
    denom = int(dist.all_sum({"count": sum(b["count"] for b, real in batches if real)})["count"])
    sums: dict[str, float] = defaultdict(float)
    for i, (batch, real) in enumerate(batches):
        with dist.sync_gradients(forward, i == len(batches) - 1):
            with autocast(precision, device):
                loss, stats = forward(batch, denom)
            if backward_pass:
                backward(loss * (dist.world() if real else 0.0), scaler)
        # a stand-in adds zeros (not its numbers times 0, which a NaN would survive): same keys everywhere
        sums["loss"] += float(loss.detach()) if real else 0.0
        for k, v in stats.items():
            sums[k] += float(v) / denom if real else 0.0
        sums["_tokens"] += int(batch["attention_mask"].sum()) if real else 0
        sums["_samples"] += batch["samples"] if real else 0
    return dist.all_sum(sums)


def evaluate(forward, examples, collate, cfg, device) -> dict:
    """Loss and stats over held-out examples, as means per unit (pair or token).

    forward: dist.wrap's module (or StageForward(model, loss_fn)); each process takes its share."""
    if not examples:
        return {}
    forward.eval()
    size = cfg.train.eval_batch_size * dist.world()
    micro = [dist.share(examples[i:i + size], dist.rank(), dist.world()) for i in range(0, len(examples), size)]
    with torch.no_grad():
        sums = run_batches(forward, micro, collate, cfg.train.precision.value, device, backward_pass=False)
    return {f"eval/{k}": v for k, v in sums.items() if not k.startswith("_")}


def optimizer_step(optimizer, scheduler, params, max_grad_norm: float, loss: float,
                   scaler=None) -> tuple[float, bool, bool]:
    """Unscale (fp16), clip, step (skipped when the loss or gradient is NaN/inf), advance the schedule:
    (grad_norm, ok, overflow). overflow: the fp16 scaler's own skip (finite loss, inf gradient while the
    scale is still being found), which lowers the scale and is counted, but is not a sign of divergence."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    clip = max_grad_norm if max_grad_norm > 0 else float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
    ok = is_finite(loss, grad_norm)
    overflow = scaler is not None and not ok and is_finite(loss) and scaler.get_scale() > 1.0
    if ok:
        scaler.step(optimizer) if scaler is not None else optimizer.step()
    if scaler is not None:
        scaler.update()
    with warnings.catch_warnings():  # a skipped first step: "lr_scheduler.step() before optimizer.step()"
        warnings.simplefilter("ignore", UserWarning)
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, ok, overflow


def train_loop(cfg, model, train_examples, eval_examples, collate, loss_fn, run_dir: Path, device) -> dict:
    """Run the optimizer steps; write metrics.jsonl and checkpoints; return the final metrics."""
    t = cfg.train
    forward = dist.wrap(model, loss_fn, t.strategy.value, device)
    params = [p for p in model.parameters() if p.requires_grad]  # after wrap: FSDP's shards
    optimizer = make_optimizer(t.optimizer.value, params, t.lr, t.weight_decay, device)
    per_epoch, total = plan_steps(len(train_examples), t, dist.world())
    scheduler = get_scheduler(t.schedule.value, optimizer, num_warmup_steps=int(t.warmup_ratio * total),
                              num_training_steps=total)
    scaler = make_scaler(t.precision.value, device)
    start, counts = 0, new_counts()
    resume_from = resume_point(cfg, run_dir)
    if resume_from is not None:
        state = load_checkpoint(resume_from, model, optimizer, scheduler, scaler)
        start = state["step"]
        counts = {k: state.get(k, 0) for k in counts}  # checkpoints older than the counters have none
        if dist.is_main():
            print(f"alignkit: resumed from {resume_from} (step {start})")
    if cfg.run.resume is not False and dist.is_main():
        truncate_jsonl(run_dir / "metrics.jsonl", start)  # lines after the checkpoint are logged again

    def save(done: int, epoch: int) -> Path:
        path = run_dir / "checkpoints" / f"step-{done}"
        save_checkpoint(path, model, optimizer, scheduler, done, {"epoch": epoch, **counts}, scaler)
        if dist.is_main():
            prune_checkpoints(run_dir, t.keep_checkpoints)
        return path

    window: dict[str, float] = defaultdict(float)
    window_steps, last = 0, {}
    t_window = time.perf_counter()
    totals = {"tokens": 0, "samples": 0, "seconds": 0.0}
    with catch_sigint() as sigint, progress_bar(total, start, shown=dist.is_main()) as bar, \
            log_file(run_dir / "metrics.jsonl") as metrics_file:
        for step, epoch, micro in step_windows(train_examples, t, per_epoch, start, total, dist.rank(), dist.world()):
            forward.train()
            t0 = time.perf_counter()
            sums = run_batches(forward, micro, collate, t.precision.value, device, True, scaler)
            sums["lr"] = scheduler.get_last_lr()[0]
            sums["grad_norm"], ok, overflow = optimizer_step(optimizer, scheduler, params, t.max_grad_norm,
                                                             sums["loss"], scaler)
            done = step + 1
            count_step(counts, ok, done, t.max_bad_steps, run_dir, overflow)
            if ok:  # a skipped step's NaNs stay out of the logged means
                for k, v in sums.items():
                    window[k] += v
                window_steps += 1
            totals["seconds"] += time.perf_counter() - t0
            if done % t.log_every == 0 or done == total:
                elapsed = time.perf_counter() - t_window
                last = {"step": done, "epoch": round(done / per_epoch, 4)}
                last.update({k: v / max(window_steps, 1) for k, v in window.items() if not k.startswith("_")})
                last["skipped_steps"] = counts["skipped_steps"]
                last["tokens_per_s"] = window["_tokens"] / elapsed
                last["samples_per_s"] = window["_samples"] / elapsed
                totals["tokens"] += window["_tokens"]
                totals["samples"] += window["_samples"]
                metrics_file.write(json.dumps(last) + "\n")
                metrics_file.flush()
                window, window_steps, t_window = defaultdict(float), 0, time.perf_counter()
            bar.update(done, last.get("loss"))
            saved = None
            if t.save_every and done % t.save_every == 0 and done < total:
                saved = save(done, epoch)
            if done < total:  # every process stops at the same step, even if Ctrl-C reached only some
                stop_if_interrupted({"hit": dist.any_rank(sigint["hit"])}, run_dir, done,
                                    lambda: saved or save(done, epoch))
        final = dict(last)
        evaluated = evaluate(forward, eval_examples, collate, cfg, device)
        if evaluated:
            metrics_file.write(json.dumps({"step": total, **evaluated}) + "\n")
    final.update(evaluated)
    final.update({
        "train_steps": total - start,
        "train_seconds": totals["seconds"],
        "train_tokens_per_s": totals["tokens"] / max(totals["seconds"], 1e-9),
        "train_samples_per_s": totals["samples"] / max(totals["seconds"], 1e-9),
        **peak_memory_mb(device),
    })
    return final


def log_file(path: Path):
    """A log (metrics.jsonl, samples.jsonl) opened for appending on rank 0; elsewhere a sink."""
    return Path(path).open("a") if dist.is_main() else open(os.devnull, "w")


def resume_point(cfg, run_dir: Path) -> Path | None:
    """The checkpoint to resume from: run.resume=true -> newest in run.dir; a path -> that one."""
    resume = cfg.run.resume
    if resume is False or resume is None:
        return None
    if resume is True:
        found = checkpoints(run_dir)
        return found[-1] if found else None
    return Path(str(resume))
