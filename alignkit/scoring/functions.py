"""Reward functions named in reward.functions, loaded and called as TRL calls them.

An entry is "pkg.module:fn" (imported), "path/to/file.py:fn" (loaded from that file) or a built-in name
(scoring/builtin.py). Each is called once per batch of completions:
    fn(prompts=[...], completions=[...], completion_ids=[[...]], **row_columns) -> list[float | None]
with one value per completion; None leaves that function out for that completion (the others still count,
TRL's nansum). Anything else (an import that fails, a missing name, a call that raises, a wrong length, a NaN or
a non-number) is a one-line UsageError.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from numbers import Real
from pathlib import Path

import torch

from ..errors import UsageError
from .builtin import BUILTIN
from .reward_model import as_completion

SKIPPED_COLUMNS = ("prompt", "completion", "completion_ids")  # passed by their own keywords


def load_module(target: str, spec: str):
    if target.endswith(".py"):
        path = Path(target).expanduser()
        if not path.is_file():
            raise UsageError(f"reward.functions: {spec}: no such file {path}")
        name = f"alignkit_reward_{abs(hash(str(path.resolve())))}"
        loader = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(loader)
        sys.modules[name] = module
        try:
            loader.loader.exec_module(module)
        except Exception as exc:  # the user's file failed while loading
            raise UsageError(f"reward.functions: {spec}: loading {path} failed: {type(exc).__name__}: {exc}") from exc
        return module
    try:
        return importlib.import_module(target)
    except ImportError as exc:
        raise UsageError(f"reward.functions: {spec}: cannot import {target} ({exc}); give pkg.module:fn with the "
                         f"package on the Python path, or path/to/file.py:fn") from exc


def load_function(spec: str):
    """(name, fn) for one reward.functions entry."""
    if ":" not in spec:
        if spec not in BUILTIN:
            raise UsageError(f"reward.functions: '{spec}' is not a built-in reward function (choose from "
                             f"{', '.join(BUILTIN)}) nor pkg.module:fn or path/to/file.py:fn")
        return spec, BUILTIN[spec]
    target, name = spec.rsplit(":", 1)
    fn = getattr(load_module(target, spec), name, None)
    if not callable(fn):
        raise UsageError(f"reward.functions: {spec}: {target} has no function '{name}'")
    return name, fn


def load_functions(specs) -> list[tuple[str, object]]:
    """The named functions, each under its function name (made unique: name, name_2, ...)."""
    loaded, seen = [], set()
    for spec in specs:
        name, fn = load_function(spec)
        unique, k = name, 1
        while unique in seen:
            k += 1
            unique = f"{name}_{k}"
        seen.add(unique)
        loaded.append((unique, fn, spec))
    return loaded


def checked(values, spec: str, n: int) -> list[float]:
    """One float per completion (None -> NaN), or a UsageError saying what is wrong."""
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    if not isinstance(values, (list, tuple)) or len(values) != n:
        got = f"{len(values)} values" if isinstance(values, (list, tuple)) else type(values).__name__
        raise UsageError(f"reward function {spec} returned {got} for {n} completions (one float or None each)")
    out = []
    for i, v in enumerate(values):
        if v is None:
            out.append(math.nan)
        elif isinstance(v, Real):  # bools and numpy numbers included
            if math.isnan(float(v)):
                raise UsageError(f"reward function {spec} returned NaN for completion {i}: return None to leave a "
                                 f"completion unscored")
            out.append(float(v))
        else:
            raise UsageError(f"reward function {spec} returned {type(v).__name__} for completion {i} (a float or "
                             f"None each)")
    return out


def functions_reward(specs):
    """(rows, completion texts, completion ids) -> {name: (N,) float tensor, NaN where a function gave None}."""
    functions = load_functions(specs)

    def reward(rows: list[dict], texts: list[str], completion_ids=None) -> dict[str, torch.Tensor]:
        prompts = [r["prompt"] for r in rows]
        columns = {k: [r.get(k) for r in rows] for k in rows[0] if k not in SKIPPED_COLUMNS} if rows else {}
        kwargs = dict(prompts=prompts, completions=[as_completion(p, t) for p, t in zip(prompts, texts)],
                      completion_ids=completion_ids if completion_ids is not None else [None] * len(texts), **columns)
        out = {}
        for name, fn, spec in functions:
            try:
                values = fn(**kwargs)
            except UsageError:
                raise
            except Exception as exc:  # the user's function failed: say which, in one line
                raise UsageError(f"reward function {spec} raised {type(exc).__name__}: {exc}") from exc
            out[name] = torch.tensor(checked(values, spec, len(texts)), dtype=torch.float32)
        return out

    return reward


def sequence_scores(out, weights=None) -> torch.Tensor:
    """One score per completion from a reward's output: its (N,) scores, or the weighted sum of reward functions'
    columns (None left out; a completion none of them scored gets 0)."""
    if not isinstance(out, dict):
        return torch.as_tensor(out).float()
    from ..objectives.grpo import combine_rewards

    columns = torch.stack([v.float() for v in out.values()], 1)
    w = torch.tensor(list(weights) if weights is not None else [1.0] * columns.shape[1])
    return combine_rewards(columns, w).nan_to_num(nan=0.0)
