"""The held-out split: one function decides it, over the raw rows, for train, eval, generate, compress and recipes.

Training records it in the run dir (heldout.json: the held-out rows' places and a hash of each), so
`alignkit eval run=RUN` evaluates exactly the rows that run never trained on, even when encoding later
dropped some rows (too long, chosen == rejected) or the data file was reordered.
"""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from ..errors import UsageError

HELD_OUT = "heldout.json"


def held_out_places(n_rows: int, fraction: float, seed: int) -> list[int]:
    """The places (0-based, in file order) of a seeded random `fraction` of n_rows rows: at least one when
    fraction > 0, never all of them."""
    order = list(range(n_rows))
    random.Random(seed).shuffle(order)
    n_eval = min(max(round(n_rows * fraction), 1 if fraction > 0 else 0), max(n_rows - 1, 0))
    return sorted(order[n_rows - n_eval:])


def row_hash(row: dict) -> str:
    return hashlib.sha256(json.dumps(row, sort_keys=True, default=str).encode()).hexdigest()[:16]


def split_items(items: list, held: list[int], place=lambda i, item: i) -> tuple[list, list]:
    """(train, held-out) parts of items, both in their order; place(i, item): the item's row place."""
    held_set = set(held)
    train = [item for i, item in enumerate(items) if place(i, item) not in held_set]
    return train, [item for i, item in enumerate(items) if place(i, item) in held_set]


def record(rows: list, held: list[int], fraction: float, seed: int) -> dict:
    """What heldout.json holds (the caller writes it atomically)."""
    return {"rows": len(rows), "eval_fraction": fraction, "seed": seed, "held_out": held,
            "hashes": [row_hash(rows[i][1]) for i in held]}


def recorded_places(run_dir: Path, rows: list) -> list[int] | None:
    """The held-out places a run recorded, checked against the rows as they are now; None for a run made
    before runs recorded them."""
    path = Path(run_dir) / HELD_OUT
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    held = saved["held_out"]
    changed = len(rows) != saved["rows"] or any(row_hash(rows[i][1]) != h for i, h in zip(held, saved["hashes"]))
    if changed:
        raise UsageError(f"the data differs from what {run_dir} trained on (its {HELD_OUT} lists "
                         f"{len(held)} held-out rows of {saved['rows']}; now there are {len(rows)} rows, or they "
                         f"changed): evaluate with the run's data (same data.path, data.limit, train.seed)")
    return held


def held_out_rows(rows: list, fraction: float, seed: int, run_dir: Path | None = None) -> list[int]:
    """The held-out places: the run's record when there is one, else the seeded split of these rows."""
    recorded = recorded_places(run_dir, rows) if run_dir is not None else None
    return recorded if recorded is not None else held_out_places(len(rows), fraction, seed)
