"""A recipe YAML + the user's overrides -> one composed, validated train config per stage.

recipes/NAME.yaml names its stages in order; each stage is a list of `alignkit train`
overrides plus `inputs` (`policy.init=sft`: the key gets that earlier stage's run dir).
A stage's overrides, in the order Hydra applies them (later wins): the recipe's shared
ones, the stage's own, its inputs, the user's shared ones (`model=tiny`, `train.seed=1`),
the user's for that stage (`sft.train.lr=1e-4` -> `train.lr=1e-4` for sft), and
`run.dir=RECIPE_DIR/STAGE`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import MISSING, DictConfig, OmegaConf

from ..config.compose import check_overrides, shipped_dir
from ..config.schema import Config
from ..errors import UsageError
from ..methods import compose, validate


@dataclass
class StageSpec:
    overrides: List[str] = field(default_factory=list)
    inputs: List[str] = field(default_factory=list)  # KEY=STAGE


@dataclass
class RecipeSpec:
    description: str = MISSING
    dir: str = MISSING
    shared: List[str] = field(default_factory=list)
    stages: Dict[str, StageSpec] = MISSING


@dataclass
class Stage:
    name: str
    overrides: list[str]  # what `alignkit train` would be given for this stage
    cfg: DictConfig
    inputs: dict[str, str]  # config key -> the stage whose run dir it gets


def recipe_dir() -> Path:
    """recipes/: the checkout's top-level recipes/, else the package data alignkit.recipes."""
    return shipped_dir("recipes", "dpo.yaml")


def recipe_names() -> list[str]:
    return sorted(p.stem for p in recipe_dir().glob("*.yaml"))


def load_recipe(name: str) -> RecipeSpec:
    path = recipe_dir() / f"{name}.yaml"
    if not path.is_file():
        raise UsageError(f"unknown recipe '{name}' (available: {', '.join(recipe_names())})")
    spec = OmegaConf.merge(OmegaConf.structured(RecipeSpec), OmegaConf.load(path))
    clash = set(spec.stages) & set(Config.__dataclass_fields__)
    if clash:
        raise UsageError(f"recipe {name}: a stage may not be named like a config section ({', '.join(clash)})")
    return spec


def _prefix_and_key(text: str) -> tuple[str, str]:
    """('+', 'sft.train.lr') for '+sft.train.lr=1'."""
    prefix = re.match(r"[+~]*", text).group(0)
    return prefix, text[len(prefix):].split("=", 1)[0]


def split_overrides(args: list[str], stages: list[str]) -> tuple[list[str], dict[str, list[str]], str | None]:
    """(shared overrides, overrides per stage with the stage prefix dropped, run.dir or None)."""
    check_overrides(args, multirun=False)
    shared, per_stage, run_dir = [], {s: [] for s in stages}, None
    for text, parsed in zip(args, OverridesParser.create().parse_overrides(args)):
        prefix, key = _prefix_and_key(text)
        head = key.split(".", 1)[0]
        if head in per_stage and "." in key:
            per_stage[head].append(prefix + text[len(prefix) + len(head) + 1:])
        elif key == "run.dir":
            run_dir = str(parsed.value())
        elif key == "run.resume":
            raise UsageError("a recipe resumes by itself: drop run.resume (re-run the same command to resume)")
        elif head == "method":
            raise UsageError(f"'{text}': the method differs per stage; address one ({', '.join(stages)}), "
                             f"e.g. {stages[-1]}.{text}")
        elif head in per_stage or head not in Config.__dataclass_fields__:
            raise UsageError(f"'{text}': not a stage key ({', '.join(s + '.KEY' for s in stages)}) "
                             f"nor a config key shared by every stage")
        else:
            shared.append(text)
    return shared, per_stage, run_dir


def plan_recipe(name: str, args: list[str]) -> tuple[Path, list[Stage]]:
    """The recipe directory and its stages, each config composed and validated (nothing runs)."""
    spec = load_recipe(name)
    names = list(spec.stages)
    shared, per_stage, run_dir = split_overrides(args, names)
    root = Path(run_dir or spec.dir)
    stages = []
    for i, stage_name in enumerate(names):
        stage = spec.stages[stage_name]
        inputs = dict(item.split("=", 1) for item in stage.inputs)
        for key, source in inputs.items():
            if source not in names[:i]:
                raise UsageError(f"recipe {name}: stage {stage_name} input {key}={source} is not an earlier stage")
        overrides = [*spec.shared, *stage.overrides, *(f"{k}={root / s}" for k, s in inputs.items()), *shared,
                     *per_stage[stage_name], f"run.dir={root / stage_name}"]
        cfg = compose(overrides)
        validate(cfg)
        stages.append(Stage(stage_name, overrides, cfg, inputs))
    return root, stages
