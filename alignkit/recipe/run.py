"""`alignkit recipe NAME [overrides]`: run the stages in order, resumable, then evaluate and report.

Each stage is a normal run directory under the recipe directory. Re-running the same
command skips the stages that finished (summary.json, same config) and resumes the one
that was interrupted from its newest checkpoint (run.resume=true). A finished stage
whose config changed is an error: its output is not silently reused.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from ..config.compose import config_changes
from ..errors import UsageError
from ..eval.run import run_eval
from ..methods import method_record
from ..session.events import write_events
from ..train import run_train
from .plan import Stage, plan_recipe
from .report import write_report


def stage_state(stage: Stage, root: Path, stages: list[Stage]) -> str:
    """done | resume | new; a stage whose config changed since it ran is a UsageError."""
    run_dir = Path(stage.cfg.run.dir)
    saved = run_dir / "config.yaml"
    if not saved.exists():
        return "new"
    changes = config_changes(saved, stage.cfg)
    done = (run_dir / "summary.json").exists()
    if changes:
        verb = "finished" if done else "was interrupted"
        raise UsageError(f"recipe stage {stage.name} {verb} in {run_dir} with another config "
                         f"({'; '.join(changes[:3])}): re-run with the same overrides, pick another run.dir, "
                         f"or delete {run_dir} to run it again")
    unfinished = [s for s in stages if s.name in stage.inputs.values() and not (root / s.name / "summary.json").exists()]
    if done and unfinished:
        raise UsageError(f"recipe stage {stage.name} finished in {run_dir} but its input stage "
                         f"{unfinished[0].name} did not: delete {run_dir} to run it again on the new input")
    return "done" if done else "resume"


def evaluate(run_dir: Path) -> dict:
    """The stage's eval.json when it was written after its summary.json (a finished stage whose config
    has not changed), else a fresh `alignkit eval run=RUN_DIR`."""
    saved = run_dir / "eval.json"
    if saved.exists() and saved.stat().st_mtime_ns >= (run_dir / "summary.json").stat().st_mtime_ns:
        return {k: v for k, v in json.loads(saved.read_text()).items() if k != "samples"}
    return run_eval([f"run={run_dir}"])


def print_plan(name: str, stages: list[Stage]) -> None:
    for stage in stages:
        print(f"# recipe {name}, stage {stage.name}: alignkit train {' '.join(stage.overrides)}")
        print(OmegaConf.to_yaml(stage.cfg))


def run_recipe(name: str, args: list[str], show_cfg: bool = False) -> dict:
    """Run (or resume) every stage, evaluate the policies, write report.md; returns {stage: summary}."""
    started = time.perf_counter()
    root, stages = plan_recipe(name, args)
    if show_cfg:
        print_plan(name, stages)
        return {}
    states = {s.name: stage_state(s, root, stages) for s in stages}  # every check before anything runs
    summaries = {}
    for i, stage in enumerate(stages):
        state = states[stage.name]
        print(f"alignkit: recipe {name}: stage {i + 1}/{len(stages)} {stage.name} ({state})", file=sys.stderr)
        run_dir = Path(stage.cfg.run.dir)
        if state == "done":
            summaries[stage.name] = json.loads((run_dir / "summary.json").read_text())
            if stage.cfg.run.tensorboard:
                write_events(run_dir)
            continue
        stage.cfg.run.resume = state == "resume"
        summaries[stage.name] = run_train(stage.cfg)
    evals = {s.name: evaluate(Path(s.cfg.run.dir)) for s in stages if method_record(s.cfg.method.name).head != "score"}
    report = write_report(name, args, root, stages, states, summaries, evals, time.perf_counter() - started)
    print(f"alignkit: recipe {name} done: {report}", file=sys.stderr)
    return summaries
