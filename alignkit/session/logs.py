"""metrics.jsonl (and online methods' samples.jsonl): one JSON object per line, each with its `step`."""
from __future__ import annotations

import json
import os
from pathlib import Path

from . import dist


def read_log(path: Path) -> list[dict]:
    """The log's records; a line cut short by a killed process is skipped."""
    if not Path(path).exists():
        return []
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def open_log(path: Path, resumed_at: int | None = None):
    """An append handle on rank 0 (elsewhere a sink). resumed_at: a resumed run's step; the records past it (an
    interrupted run wrote them after its last checkpoint, maybe a torn last line) are dropped first, so a
    resumed run logs each step once."""
    if not dist.is_main():
        return open(os.devnull, "w")
    if resumed_at is not None:
        truncate_jsonl(path, resumed_at)
    return Path(path).open("a")


def truncate_jsonl(path: Path, step: int) -> None:
    """Keep the lines of a resumed run's log up to `step` (later ones are redone); drop a torn last line."""
    path = Path(path)
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line torn by a kill while it was written
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, path)
