"""`alignkit eval` and `alignkit generate`: a finished run (run=DIR) or a plain model (model.path=...)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from ..adapters import base_load_options
from ..config.compose import check_overrides
from ..data.load import load_rows
from ..data.split import held_out_rows, split_items
from ..data.tokenize import row_prompt
from ..errors import UsageError
from ..generation.sample import generate
from ..io import atomic_json
from ..methods import compose, validate
from ..models.load import load_base_model, pick_device
from ..runs.read import head_of, load_run
from ..session.progress import print_table
from .metrics import gold_metrics, kl_metrics, preference_metrics


def target(args: list[str]):
    """(model, tokenizer, cfg, run_dir or None) from `run=DIR [key=value ...]` or plain overrides."""
    runs = [a.split("=", 1)[1] for a in args if a.startswith("run=")]
    rest = [a for a in args if not a.startswith("run=")]
    if not runs:
        cfg = compose(rest)
        validate(cfg)
        device = pick_device()
        model, tokenizer, _ = load_base_model(cfg.model, device, head_of(cfg), **base_load_options(cfg.adapter, device))
        return model.eval(), tokenizer, cfg, None
    model, tokenizer, cfg = load_run(runs[0])
    check_overrides(rest, multirun=False)
    for override in OverridesParser.create().parse_overrides(rest):
        key = override.key_or_group
        if OmegaConf.select(cfg, key, default="<missing>") == "<missing>":
            raise UsageError(f"unknown key '{key}' (a run's config can take key=value overrides only)")
        OmegaConf.update(cfg, key, override.value())
    validate(cfg)
    return model, tokenizer, cfg, Path(runs[0])


def held_out(cfg: DictConfig, run_dir: Path | None = None) -> tuple[list, list]:
    """(train rows, held-out rows): the rows a run recorded as held out, else the seeded split of the raw rows
    (all rows if eval_fraction is 0)."""
    rows = load_rows(cfg.data, cfg.train.seed)
    train, held = split_items(rows, held_out_rows(rows, cfg.data.eval_fraction, cfg.train.seed, run_dir))
    return (train, held) if held else (rows, rows)


def run_eval(args: list[str]) -> dict:
    model, tokenizer, cfg, run_dir = target(args)
    _, rows = held_out(cfg, run_dir)
    result = {"method": cfg.method.name, "adapter": cfg.adapter.name, "rows": len(rows)}
    result.update(preference_metrics(model, tokenizer, cfg, rows, run_dir))
    gold, samples = gold_metrics(model, tokenizer, cfg, rows)
    result.update(gold)
    result.update(kl_metrics(model, tokenizer, cfg, rows))
    if run_dir is not None:
        atomic_json(run_dir / "eval.json", {**result, "samples": samples[:8]})
    print_table(f"eval: {run_dir or cfg.model.path}", result)
    return result


def run_generate(args: list[str]) -> list[dict]:
    model, tokenizer, cfg, run_dir = target(args)
    device = next(model.parameters()).device
    prompts = list(cfg.sample.prompts) if cfg.sample.prompts else \
        [p for _, r in held_out(cfg, run_dir)[1] if (p := row_prompt(r))][: cfg.sample.num_prompts]
    outputs = generate(model, tokenizer, prompts, cfg.sample, device, cfg.train.seed)
    records = [{"prompt": p, "completion": o} for p, o in zip(prompts, outputs)]
    for record in records:
        print(json.dumps(record, ensure_ascii=False))
    sys.stdout.flush()
    return records
