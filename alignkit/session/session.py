"""One training session: what every loop needs, around one state.

The optimizer, the schedule, fp16's gradient scaler, clipping, skipping NaN/inf steps, resuming from a
checkpoint, atomic checkpoints and their pruning, Ctrl-C, metrics.jsonl (and samples.jsonl), the progress
bar and the run's throughput. The offline and online loops (loops.py) call it; a method never does its own
bookkeeping. `state` holds what a method keeps across steps (PPO's KL coefficient): it is saved in every
checkpoint and restored on resume.
"""
from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from transformers import get_scheduler

from ..errors import UsageError
from . import dist, startup
from .checkpoint import load_checkpoint, prune_checkpoints, save_checkpoint
from .faults import catch_sigint, count_step, new_counts, stop_if_interrupted
from .logs import open_log
from .optim import clipped_step, make_optimizer, make_scaler
from .progress import progress_bar
from .resources import peak_memory_mb
from .rundir import checkpoints


class Session:
    def __init__(self, cfg, model, run_dir: Path, device: torch.device, per_epoch: int, total: int,
                 updates_per_step: int = 1, state: dict | None = None):
        t = cfg.train
        self.cfg, self.model, self.run_dir, self.device = cfg, model, Path(run_dir), device
        self.per_epoch, self.total = per_epoch, total
        self.params = [p for p in model.parameters() if p.requires_grad]  # after dist.wrap: FSDP's shards
        self.optimizer = make_optimizer(t.optimizer.value, self.params, t.lr, t.weight_decay, device, model,
                                        t.loraplus_lr_ratio)
        updates = total * updates_per_step
        self.scheduler = get_scheduler(t.schedule.value, self.optimizer, num_training_steps=updates,
                                       num_warmup_steps=int(t.warmup_ratio * updates))
        self.scaler = make_scaler(t.precision.value, device)
        self.counts, self.state = new_counts(), dict(state or {})
        self.start = self._resume()
        self._skipped = self._bad = False  # in the step under way: any update skipped; one not the scaler's
        self._window: dict[str, float] = defaultdict(float)
        self._seen: dict[str, int] = defaultdict(int)
        self._window_start = time.perf_counter()
        self.last: dict = {}
        self.totals = {"tokens": 0.0, "samples": 0.0, "seconds": 0.0}

    def _resume(self) -> int:
        """Restore the checkpoint run.resume names (true: the newest in run.dir); the step to start from."""
        resume = self.cfg.run.resume
        start = 0
        if resume is not False and resume is not None:
            found = checkpoints(self.run_dir) if resume is True else [Path(str(resume))]
            if found and not (found[-1] / "state.json").exists():
                raise UsageError(f"run.resume={resume}: {found[-1]} is not a checkpoint (no state.json); give a "
                                 f"RUN/checkpoints/step-N dir, or run.resume=true for the newest in run.dir")
            if found:
                saved = load_checkpoint(found[-1], self.model, self.optimizer, self.scheduler, self.scaler)
                start = saved["step"]
                self.counts = {k: saved.get(k, 0) for k in self.counts}  # older checkpoints have no counters
                self.state.update({k: saved[k] for k in self.state if k in saved})
                if dist.is_main():
                    print(f"alignkit: resumed from {found[-1]} (step {start})")
        return start

    @contextlib.contextmanager
    def running(self, samples: bool = False):
        """Around the loop: Ctrl-C caught, the progress bar, metrics.jsonl (and samples.jsonl) open for
        appending on rank 0, their lines after the resumed step dropped first (they are logged again)."""
        resumed = self.cfg.run.resume is not False
        names = ["metrics.jsonl"] + (["samples.jsonl"] if samples else [])
        with catch_sigint() as sigint, progress_bar(self.total, self.start, shown=dist.is_main()) as bar, \
                contextlib.ExitStack() as logs:
            self._sigint, self._bar = sigint, bar
            startup.mark("setup")
            self.logs = {name: logs.enter_context(open_log(self.run_dir / name, self.start if resumed else None))
                         for name in names}
            yield self

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def optimizer_step(self, loss: float) -> tuple[float, bool]:
        """Unscale (fp16), clip, step or skip (NaN/inf), advance the schedule: (grad_norm, ok). A skip by fp16's
        scaler while it finds its scale is counted but is no sign of divergence (optim.clipped_step); any other
        counts towards train.max_bad_steps."""
        grad_norm, ok, overflow = clipped_step(self.optimizer, self.scheduler, self.params,
                                               self.cfg.train.max_grad_norm, loss, self.scaler)
        self._skipped |= not ok
        self._bad |= not ok and not overflow
        return grad_norm, ok

    def end_step(self, done: int, epoch: int, record: dict, seconds: float) -> None:
        """After optimizer step `done`: count a skipped step, log (means over train.log_every steps; NaNs
        left out), the progress bar, a checkpoint every train.save_every, Ctrl-C. record: this step's
        numbers; `_tokens` and `_samples` (sums) give the throughput."""
        t = self.cfg.train
        startup.mark("first_step")
        count_step(self.counts, not self._skipped, done, t.max_bad_steps, self.run_dir, overflow=not self._bad)
        self._skipped = self._bad = False
        for key, value in record.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self._window[key] += value
                self._seen[key] += 1
        self.totals["seconds"] += seconds
        if done % t.log_every == 0 or done == self.total:
            self._write_line(done)
        self._bar.update(done, self.last.get("loss"))
        saved = None
        if t.save_every and done % t.save_every == 0 and done < self.total:
            saved = self.save(done, epoch)
        if done < self.total:  # every process stops at the same step, even if Ctrl-C reached only some
            stop_if_interrupted({"hit": dist.any_rank(self._sigint["hit"])}, self.run_dir, done,
                                lambda: saved or self.save(done, epoch))

    def _write_line(self, done: int) -> None:
        elapsed = time.perf_counter() - self._window_start
        tokens, samples = self._window.pop("_tokens", 0.0), self._window.pop("_samples", 0.0)
        self.last = {"step": done, "epoch": round(done / self.per_epoch, 4)}
        self.last.update({k: v / self._seen[k] for k, v in self._window.items() if not k.startswith("_")})
        self.last.update(skipped_steps=self.counts["skipped_steps"], tokens_per_s=tokens / elapsed,
                         samples_per_s=samples / elapsed)
        self.totals["tokens"] += tokens
        self.totals["samples"] += samples
        self.log("metrics.jsonl", self.last)
        self._window, self._seen = defaultdict(float), defaultdict(int)
        self._window_start = time.perf_counter()

    def log(self, name: str, record: dict) -> None:
        """One line in a run log (rank 0 writes; elsewhere a sink)."""
        self.logs[name].write(json.dumps(record, ensure_ascii=False) + "\n")
        self.logs[name].flush()

    def save(self, done: int, epoch: int) -> Path:
        """A checkpoint after step `done` (every process takes part: FSDP gathers; rank 0 writes)."""
        path = self.run_dir / "checkpoints" / f"step-{done}"
        save_checkpoint(path, self.model, self.optimizer, self.scheduler, done,
                        {"epoch": epoch, **self.counts, **self.state}, self.scaler)
        if dist.is_main():
            prune_checkpoints(self.run_dir, self.cfg.train.keep_checkpoints)
        return path

    def summary(self) -> dict:
        """The run's totals for summary.json: the last logged line, steps, seconds, throughput, peak memory."""
        seconds = max(self.totals["seconds"], 1e-9)
        return {**self.last, "train_steps": self.total - self.start, "train_seconds": self.totals["seconds"],
                "train_tokens_per_s": self.totals["tokens"] / seconds,
                "train_samples_per_s": self.totals["samples"] / seconds, **peak_memory_mb(self.device)}


def say(message: str) -> None:
    """A line on stderr from rank 0."""
    if dist.is_main():
        print(message, file=sys.stderr)
