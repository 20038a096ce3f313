"""metrics.jsonl (and PPO's samples.jsonl): one JSON object per line, each with its `step`."""
from __future__ import annotations

import json
from pathlib import Path


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


def open_log(path: Path, start: int):
    """An append handle; records past step `start` (an interrupted run wrote them after its last
    checkpoint, maybe a torn last line) are dropped first, so a resumed run logs each step once."""
    from .rundir import truncate_jsonl

    truncate_jsonl(path, start)
    return Path(path).open("a")
