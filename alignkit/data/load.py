"""Read rows from a file, a hub dataset or a built-in task; split off eval rows."""
from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig

from ..errors import UsageError
from .tasks import TASKS

Row = tuple[str, dict]  # (where it came from, e.g. "prefs.jsonl line 3"; the row)


def read_jsonl(path: Path) -> list[Row]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UsageError(f"{path} line {number}: malformed JSON ({exc.msg})") from exc
            if not isinstance(row, dict):
                raise UsageError(f"{path} line {number}: expected a JSON object, got {type(row).__name__}")
            rows.append((f"{path} line {number}", row))
    return rows


def read_with_datasets(source: str, builder: str | None) -> list[Row]:
    """.json/.parquet files and hub datasets, through the datasets library."""
    import datasets

    from ..models.hub import hub_offline, offline_hint

    hub = builder is None
    if hub:
        hub_offline()  # no hub: the local datasets cache only, at once
    try:
        if builder:
            ds = datasets.load_dataset(builder, data_files=source, split="train")
        else:
            ds = datasets.load_dataset(source, split="train")
    except Exception as exc:  # datasets raises many types (connection, schema, file format)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if hub and hub_offline():
            raise UsageError(f"cannot load data '{source}'{offline_hint(source)}") from exc
        raise UsageError(f"cannot load data '{source}': {first}") from exc
    return [(f"{source} row {i + 1}", dict(row)) for i, row in enumerate(ds)]


def read_path(path: str) -> list[Row]:
    p = Path(path).expanduser()
    if p.suffix in (".jsonl", ".json", ".parquet"):
        if not p.is_file():
            raise UsageError(f"data.path: no such file: {p}")
        return read_jsonl(p) if p.suffix == ".jsonl" else read_with_datasets(str(p), p.suffix[1:])
    if p.exists() or path.startswith((".", "/", "~")):
        raise UsageError(f"data.path: {p} is not a .jsonl, .json or .parquet file")
    return read_with_datasets(path, None)  # a hub dataset id


def load_rows(data: DictConfig, seed: int) -> list[Row]:
    if data.path is not None:
        rows = read_path(data.path)
    else:
        if data.task not in TASKS:
            raise UsageError(f"unknown data.task '{data.task}' (built-in tasks: {', '.join(TASKS)})")
        rows = [(f"task {data.task} row {i + 1}", r) for i, r in enumerate(TASKS[data.task][0](data.task_size, seed))]
    if data.limit is not None:
        rows = rows[: data.limit]
    if not rows:
        raise UsageError(f"data: no rows in {data.path or data.task}: add rows in TRL's format "
                         f"(a .jsonl file has one JSON object per line)")
    return rows
