"""`alignkit eval` and `alignkit generate`: a finished run (run=DIR) or a plain model (model.path=...)."""
from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from hydra.core.override_parser.overrides_parser import OverridesParser

from ..config.compose import check_overrides, compose_config
from ..config.schema import DPOLoss, DPOMethod
from ..config.validate import validate
from ..data.collate import collate_preference
from ..data.load import load_rows
from ..data.split import held_out_rows, split_items
from ..data.tasks import TASKS
from ..data.tokenize import encode_rows, row_prompt
from ..errors import UsageError
from ..models.cache import cache_root
from ..models.fingerprint import weights_fingerprint
from ..models.load import base_model_cfg, load_base_model, load_run, pick_device
from ..stages import dpo, rm
from ..stages.checkpoint import atomic_json
from ..stages.dist import StageForward
from ..stages.loop import evaluate
from ..stages.progress import print_table
from ..stages.ppo import forward_policy, sample_responses
from .sample import generate, generation_config, prompt_ids


def target(args: list[str]):
    """(model, tokenizer, cfg, run_dir or None) from `run=DIR [key=value ...]` or plain overrides."""
    runs = [a.split("=", 1)[1] for a in args if a.startswith("run=")]
    rest = [a for a in args if not a.startswith("run=")]
    if not runs:
        cfg = compose_config(rest)
        validate(cfg)
        model, tokenizer, _ = load_base_model(cfg.model, cfg.adapter, pick_device())
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


def preference_metrics(model, tokenizer, cfg, rows, run_dir) -> dict:
    """RM: accuracy/margin. Policy: DPO metrics vs its reference (base with the adapter off)."""
    if not all("chosen" in r and "rejected" in r for _, r in rows):
        return {}
    device = next(model.parameters()).device
    examples = encode_rows(tokenizer, rows, cfg.data, "preference")
    collate = partial(collate_preference, pad_id=tokenizer.pad_token_id)
    if cfg.method.name == "rm":
        step = partial(rm.rm_step, margin_scale=cfg.method.margin, center_coef=cfg.method.center_coef)
    else:
        beta = cfg.method.beta if cfg.method.name == "dpo" else 0.1  # an SFT run: TRL's default beta
        method = OmegaConf.structured(DPOMethod(name="dpo", beta=beta, loss=DPOLoss.sigmoid, label_smoothing=0.0,
                                                gamma=0.0, precompute_ref=False))
        step = partial(dpo.dpo_step, method=method)
        if not hasattr(model, "disable_adapter"):  # full fine-tune: the reference is the model it started from
            base, _, _ = load_base_model(base_model_cfg(cfg), cfg.adapter, device)
            # a run's reference cache lives in its run dir; a plain model's in the alignkit cache (keyed by the
            # weights, precision and tokens, so another model or data set never reads it)
            folder = run_dir if run_dir is not None else cache_root() / "reference" / weights_fingerprint(base)
            dpo.precompute_reference(base, examples, collate, cfg.train.eval_batch_size, device,
                                     cfg.train.precision.value, Path(folder) / "eval_ref_logps.safetensors")
            del base
    return {k.removeprefix("eval/"): v for k, v in evaluate(StageForward(model, step), examples, collate, cfg, device).items()}


def gold_metrics(model, tokenizer, cfg, rows) -> tuple[dict, list]:
    """Greedy generations on held-out prompts of a built-in task, judged by its gold judge."""
    if cfg.data.task is None or cfg.method.name == "rm":
        return {}, []
    judge = TASKS[cfg.data.task][1]
    rows = [r for _, r in rows][: cfg.sample.num_prompts]
    device = next(model.parameters()).device
    outputs = generate(model, tokenizer, [r["prompt"] for r in rows], cfg.sample, device, cfg.train.seed)
    scores = [judge(o, r["answer"]) for o, r in zip(outputs, rows)]
    metrics = {"gold/score": sum(scores) / len(scores)}
    samples = [{"prompt": r["prompt"], "completion": o, "gold": s} for r, o, s in zip(rows, outputs, scores)]
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            ref = generate(model, tokenizer, [r["prompt"] for r in rows], cfg.sample, device, cfg.train.seed)
        ref_scores = [judge(o, r["answer"]) for o, r in zip(ref, rows)]
        metrics["gold/score_ref"] = sum(ref_scores) / len(rows)
        # per prompt: the policy beats its reference (1), ties (0.5) or loses (0) by the gold judge
        metrics["gold/win_rate"] = sum(float(s > q) + 0.5 * (s == q) for s, q in zip(scores, ref_scores)) / len(rows)
        for s, o, q in zip(samples, ref, ref_scores):
            s["completion_ref"], s["gold_ref"] = o, q
    return metrics, samples


def kl_metrics(model, tokenizer, cfg, rows) -> dict:
    """kl_to_ref: KL(policy || reference) in nats per completion, the k1 estimate (sum over tokens of
    log p - log p_ref) on completions sampled from the policy at temperature 1; reference = adapters off."""
    prompts = [p for _, r in rows if (p := row_prompt(r))][: cfg.sample.num_prompts]
    if cfg.method.name == "rm" or not prompts or not hasattr(model, "disable_adapter"):
        return {}
    device = next(model.parameters()).device
    gen = generation_config(tokenizer, cfg.sample.max_new_tokens, 1.0, 0, 1.0)
    torch.manual_seed(cfg.train.seed)
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(prompts), cfg.sample.batch_size):
            chunk = [prompt_ids(tokenizer, p) for p in prompts[i:i + cfg.sample.batch_size]]
            ids, attn, mask, _ = sample_responses(model, tokenizer, chunk, gen, device)
            logp = forward_policy(model, ids, attn, mask.shape[1], 1.0, values=False)[0]
            with model.disable_adapter():
                ref = forward_policy(model, ids, attn, mask.shape[1], 1.0, values=False)[0]
            total += float(((logp - ref) * mask).sum())
    return {"kl_to_ref": total / len(prompts)}


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
