"""Where a run's time went before its first optimizer step: summary.json's `startup` record.

Marks are wall-clock times (time.time()), so a benchmark in another process can line them up with its own
clock. A run's phases follow one another: the first run of a process starts when alignkit was imported (the
interpreter's own start, ~50 ms, is not counted: /proc's process start time is the fork, which a shell's
`cmd && alignkit ...` or a container's `exec` makes far earlier than the exec), a later one (a sweep's next
job) where the one before it ended.
"""
from __future__ import annotations

import time

from .. import IMPORTED_AT

PHASES = ("config", "read_data", "import", "model_load", "tokenise", "adapter", "setup", "first_step")
_marks: dict[str, float] = {}
_last_end: list[float] = []


def begin() -> None:
    """A run starts: at alignkit's import for the first run, else at the end of the one before."""
    _marks.clear()
    _marks["start"] = _last_end[-1] if _last_end else IMPORTED_AT


def mark(phase: str) -> None:
    """Phase `phase` (one of PHASES) ends now; the first mark of a phase counts."""
    if "start" in _marks:
        _marks.setdefault(phase, time.time())


def record() -> dict:
    """Seconds per phase in PHASES order (a phase not marked is left out; each counts from the mark before
    it), `to_first_step_s` (start to the first step's beginning) and the marks' wall-clock times."""
    if "start" not in _marks:  # not started by `alignkit train` (a recipe stage, a test): nothing to say
        return {}
    out: dict = {}
    before = _marks["start"]
    for phase in PHASES:
        if phase in _marks:
            out[f"{phase}_s"] = round(_marks[phase] - before, 3)
            before = _marks[phase]
    if "setup" in _marks:
        out["to_first_step_s"] = round(_marks["setup"] - _marks["start"], 3)
    out["marks"] = dict(_marks)
    return out


def end() -> None:
    """A run ended: the next one in this process starts now; marks until then count for nothing."""
    _marks.clear()
    _last_end.append(time.time())
