"""What the training loops do about faults: Ctrl-C and NaN/inf steps.

Ctrl-C: the step in flight finishes, a checkpoint is saved and Interrupted is raised (the CLI
prints a resume hint, exit 130); a second Ctrl-C stops at once. A step whose loss or gradient
norm is NaN/inf is skipped (no optimizer update) and counted; after train.max_bad_steps such
steps in a row the run stops with a UsageError and keeps its last checkpoint.
"""
from __future__ import annotations

import contextlib
import math
import signal
import sys
from pathlib import Path

from ..errors import Interrupted, UsageError
from . import dist
from .rundir import checkpoints


@contextlib.contextmanager
def catch_sigint():
    """Yield a dict whose "hit" turns True on the first Ctrl-C; the previous handler comes back after."""
    flag = {"hit": False}

    def handler(signum, frame):
        if flag["hit"]:
            raise KeyboardInterrupt
        flag["hit"] = True
        if dist.is_main():  # under torchrun every process gets the Ctrl-C: one message
            print("\nalignkit: interrupted: saving a checkpoint after this step (Ctrl-C again to stop at once)",
                  file=sys.stderr)

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: leave Ctrl-C alone
        previous = None
    try:
        yield flag
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def stop_if_interrupted(flag: dict, run_dir: Path, step: int, save) -> None:
    """After a step: on Ctrl-C, save() a checkpoint (returns its path) and raise Interrupted."""
    if flag["hit"]:
        raise Interrupted(run_dir, step, save())


def new_counts() -> dict:
    """Counters saved in each checkpoint: skipped_steps (total) and bad_streak (consecutive)."""
    return {"skipped_steps": 0, "bad_streak": 0}


def is_finite(*values: float) -> bool:
    return all(math.isfinite(v) for v in values)


def count_step(counts: dict, ok: bool, step: int, limit: int, run_dir: Path, overflow: bool = False) -> None:
    """Count a skipped (not ok) step; raise after `limit` in a row, naming the checkpoint that is kept.
    overflow: the fp16 gradient scaler skipped it while finding its scale: counted, not a bad streak."""
    if ok:
        counts["bad_streak"] = 0
        return
    counts["skipped_steps"] += 1
    if overflow:
        return
    counts["bad_streak"] += 1
    if dist.is_main():
        print(f"alignkit: step {step}: NaN/inf loss or gradient, step skipped "
              f"({counts['bad_streak']} in a row, stop at train.max_bad_steps={limit})", file=sys.stderr)
    if counts["bad_streak"] >= limit:
        saved = checkpoints(run_dir)
        kept = f"the last good checkpoint is {saved[-1]}" if saved else "no checkpoint was saved (train.save_every)"
        raise UsageError(f"stopped at step {step}: {limit} steps in a row had a NaN/inf loss or gradient "
                         f"(train.max_bad_steps={limit}); {kept}; lower train.lr or check the data")
