"""Compose the run config with Hydra's compose API, and expand `-m` sweeps."""
from __future__ import annotations

import itertools
from datetime import datetime
from importlib.resources import files
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from .schema import Config, register

_STARTED = datetime.now()


def shipped_dir(name: str, marker: str) -> Path:
    """A YAML folder shipped inside the wheel as alignkit.<name>; in a checkout, the top-level <name>/.

    The checkout's folder wins when it exists (it holds `marker`), so a source tree on PYTHONPATH
    uses its own YAMLs even when another checkout is installed in editable mode.
    """
    checkout = Path(__file__).resolve().parents[2] / name
    if (checkout / marker).exists():
        return checkout
    return Path(str(files(f"alignkit.{name}")))


def config_dir() -> Path:
    """configs/: the checkout's top-level configs/, else the package data alignkit.configs."""
    return shipped_dir("configs", "config.yaml")


def compose_config(overrides: list[str], groups: dict[str, dict[str, type]]) -> DictConfig:
    """Compose configs/config.yaml with Hydra overrides; resolve interpolations once.

    groups: the schema of each method and adapter option ({"method": {name: dataclass}, ...}), which their
    records own; alignkit.methods.compose passes the registry's."""
    register(groups)
    if not OmegaConf.has_resolver("now"):
        # the same timestamp for every job of one invocation
        OmegaConf.register_new_resolver("now", lambda fmt: _STARTED.strftime(fmt))
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
        cfg = compose(config_name="config", overrides=overrides)
    OmegaConf.resolve(cfg)
    if cfg.data.path is not None:
        cfg.data.task = None  # data.path wins over the default built-in task
    return cfg


def check_overrides(overrides: list[str], multirun: bool) -> None:
    """Parse each override alone so a syntax error names the override it is in."""
    from ..errors import UsageError

    parser = OverridesParser.create()
    for text in overrides:
        try:
            (ov,) = parser.parse_overrides([text])
        except Exception as exc:  # hydra's OverrideParseException, message on several lines
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip() and not ln.startswith("See ")]
            detail = lines[-1] if lines else "syntax error"
            raise UsageError(f"bad override '{text}': {detail}") from exc
        if ov.is_sweep_override() and not multirun:
            raise UsageError(f"'{text}' is a sweep: add -m to run one job per value")


def expand_sweeps(overrides: list[str]) -> list[list[str]]:
    """Cartesian product of sweep overrides (`a=1,2 b=x,y`), as Hydra's basic sweeper does."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    choices = []
    for ov in parsed:
        if ov.is_sweep_override():
            key = ov.get_key_element()
            choices.append([f"{key}={v}" for v in ov.sweep_string_iterator()])
        else:
            choices.append([ov.input_line])
    return [list(job) for job in itertools.product(*choices)]


def group_options() -> dict[str, list[str]]:
    """Option names of each config group, from the YAML files."""
    root = config_dir()
    return {  # a file named _NAME is shared by the options of its group, not an option itself
        d.name: sorted(p.stem for p in d.glob("*.yaml") if not p.stem.startswith("_"))
        for d in sorted(root.iterdir())
        if d.is_dir() and any(d.glob("*.yaml"))
    }


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


HOW_TO_RUN = ("launcher", "nproc")


def config_changes(saved: Path, cfg: DictConfig) -> list[str]:
    """`key: old -> new` for each value where cfg differs from a run's saved config.yaml.

    run.*, launcher and nproc say where and how a run executes, not what it computes, so a run may be
    resumed with another process count. Compared as YAML text round-trips, so enums and plain
    strings compare equal.
    """
    old = _flatten(OmegaConf.to_container(OmegaConf.load(saved)))
    new = _flatten(OmegaConf.to_container(OmegaConf.create(OmegaConf.to_yaml(cfg))))
    keys = sorted(k for k in old.keys() | new.keys()
                  if not k.startswith("run.") and k not in HOW_TO_RUN and old.get(k) != new.get(k))
    return [f"{k}: {old.get(k, '<unset>')} -> {new.get(k, '<unset>')}" for k in keys]


def load_saved_config(path: Path, groups: dict[str, dict[str, type]]) -> DictConfig:
    """A run's config.yaml, typed again by the schemas (enums, struct mode) so loaders can use it."""
    raw = OmegaConf.load(path)
    defaults = compose_config([], groups)
    for key in defaults:  # sections and keys added to alignkit after the run was made
        if key not in raw:
            raw[key] = defaults[key]
        elif key not in groups and OmegaConf.is_dict(defaults[key]):  # a plain section (not a group choice,
            # not a top-level value such as nproc)
            for sub in defaults[key]:
                if sub not in raw[key]:
                    raw[key][sub] = defaults[key][sub]
    for group in groups:  # keys a group option gained since (adapter.use_dora, ...): that option's defaults
        name = raw[group].name
        if name in group_options().get(group, []):
            for sub, value in compose_config([f"{group}={name}"], groups)[group].items():
                if sub not in raw[group]:
                    raw[group][sub] = value
    cfg = OmegaConf.merge(OmegaConf.structured(Config), raw)
    for group, schemas in groups.items():
        cfg[group] = OmegaConf.merge(OmegaConf.structured(schemas[raw[group].name]), raw[group])
    OmegaConf.set_struct(cfg, True)
    return cfg
