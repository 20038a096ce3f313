"""The run directory: may we write it (new, resume, overwrite), what is in it, and the checks that
need no model (run dir, data rows), run before the heavy imports so bad input fails in a second.

Imports nothing heavy (no torch): the CLI calls `preflight` before loading the training code.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ..config.compose import config_changes
from ..data.load import Row, load_rows
from ..errors import Interrupted, UsageError


def checkpoints(run_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first (a half-written one is a hidden temp dir, never step-N)."""
    found = [p for p in (Path(run_dir) / "checkpoints").glob("step-*") if (p / "state.json").exists()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def check_writable(run_dir: Path) -> None:
    """The nearest existing ancestor of run_dir must be a directory we may create entries in."""
    parent = run_dir
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"run.dir {run_dir}: {parent} is a file, not a directory: pick another run.dir")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"run.dir {run_dir}: {parent} is not writable: make it writable or pick another run.dir")


def check_run_dir(cfg: DictConfig) -> Path:
    """Refuse to write over an earlier run unless resuming it with the same config or run.overwrite=true."""
    run_dir = Path(cfg.run.dir)
    check_writable(run_dir)
    if cfg.run.resume is False:
        if run_dir.exists() and any(run_dir.iterdir()):
            if not cfg.run.overwrite:
                raise UsageError(f"run.dir {run_dir} already exists and is not empty: pick another run.dir, "
                                 f"resume it with run.resume=true, or replace it with run.overwrite=true")
            if not (run_dir / "config.yaml").exists():
                raise UsageError(f"run.dir {run_dir} is not an alignkit run (no config.yaml): run.overwrite=true "
                                 f"only replaces runs; pick another run.dir")
        return run_dir
    if (run_dir / "summary.json").exists():
        raise UsageError(f"run {run_dir} already finished (summary.json exists); nothing to resume "
                         f"(run.overwrite=true without run.resume replaces it)")
    saved = run_dir / "config.yaml"
    changes = config_changes(saved, cfg) if saved.exists() else []  # the run.* settings may differ
    if changes:
        raise UsageError(f"run.resume: the config differs from the one {run_dir} was started with "
                         f"({'; '.join(changes[:3])}); resume with the same overrides")
    if cfg.run.resume is True and not checkpoints(run_dir):
        print(f"alignkit: no checkpoint in {run_dir}; starting from step 0", file=sys.stderr)
    return run_dir


def preflight(cfg: DictConfig) -> list[Row]:
    """Check the run dir and read the data rows: everything that fails without a model."""
    check_run_dir(cfg)
    return load_rows(cfg.data, cfg.train.seed)


@contextlib.contextmanager
def replacing(run_dir: Path, overwrite: bool):
    """run.overwrite=true: move an earlier run aside, delete it only once the body (the new run) has
    finished; if the body fails or is interrupted, the new partial run goes and the old one comes back."""
    run_dir = Path(run_dir)
    if not (overwrite and run_dir.exists() and any(run_dir.iterdir())):
        yield
        return
    aside = run_dir.parent / f".{run_dir.name}.replaced-{os.getpid()}"
    os.replace(run_dir, aside)
    try:
        yield
    except BaseException as exc:
        shutil.rmtree(run_dir, ignore_errors=True)
        os.replace(aside, run_dir)
        kept = f"the new run was discarded and the earlier run in {run_dir} kept"
        if isinstance(exc, UsageError):
            raise UsageError(f"{exc}; {kept}") from exc
        if isinstance(exc, Interrupted):  # its checkpoint went with the new run: nothing to resume
            exc.run_dir = None
        print(f"alignkit: {kept}", file=sys.stderr)
        raise
    shutil.rmtree(aside, ignore_errors=True)
