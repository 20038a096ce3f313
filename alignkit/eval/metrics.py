"""What `alignkit eval` measures: the method's own held-out numbers, DPO metrics of a policy against its
reference, the gold score of its completions, and its KL to the reference."""
from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ..adapters import base_load_options
from ..data.collate import collate_preference
from ..data.tasks import TASKS
from ..data.tokenize import encode_rows, row_prompt
from ..forward.policy import response_forward
from ..adapters.reference import reference_mode
from ..forward.reference import pair_reference, precompute_reference
from ..generation.sample import generate, generation_config, prompt_ids, sample_responses
from ..methods import method_record
from ..methods.dpo import DPOLoss, DPOMethod, dpo_step
from ..models.cache import cache_root
from ..models.fingerprint import weights_fingerprint
from ..models.load import load_base_model
from ..runs.read import base_model_cfg
from ..session.dist import LossModule
from ..session.loops import evaluate

OWN_STEP_DATA = ("preference", "unpaired")  # methods whose own step scores held-out preference rows


def policy_dpo_method(cfg):
    """Plain sigmoid DPO at eval.beta: the DPO metrics reported for a policy whose method has no own."""
    return OmegaConf.structured(DPOMethod(name="dpo", beta=cfg.eval.beta, loss=DPOLoss.sigmoid, label_smoothing=0.0,
                                          gamma=0.0, precompute_ref=False))


def scores_rows(kind: str, row: dict) -> bool:
    """A held-out row the preference metrics can score: a pair, or for unpaired data also a labelled answer."""
    return ("chosen" in row and "rejected" in row) or (kind == "unpaired" and "label" in row)


def preference_metrics(model, tokenizer, cfg, rows, run_dir) -> dict:
    """The held-out numbers of the run's method when its step scores preference or unpaired rows (reward-model
    accuracy, the DPO family's rewards, KTO's, ORPO's, ...); else DPO metrics of the policy against its
    reference at eval.beta."""
    record = method_record(cfg.method.name)
    if not all(scores_rows(record.data, r) for _, r in rows):
        return {}
    device = next(model.parameters()).device
    if record.data in OWN_STEP_DATA:
        examples, collate = record.prepare(cfg, tokenizer, rows)
        step, values, uses_ref = partial(record.step, method=cfg.method), record.reference_values, \
            record.reference(cfg.method)
    else:
        examples = encode_rows(tokenizer, rows, cfg.data, "preference")
        collate = partial(collate_preference, pad_id=tokenizer.pad_token_id)
        step, values, uses_ref = partial(dpo_step, method=policy_dpo_method(cfg)), pair_reference, True
    if uses_ref and not hasattr(model, "disable_adapter"):  # trained the weights: the reference is its base
        base, _, _ = load_base_model(base_model_cfg(cfg), device, **base_load_options(cfg.adapter, device))
        # a run's reference cache lives in its run dir; a plain model's in the alignkit cache (keyed by the
        # weights, precision and tokens, so another model or data set never reads it)
        folder = run_dir if run_dir is not None else cache_root() / "reference" / weights_fingerprint(base)
        precompute_reference(base, examples, collate, cfg.train.eval_batch_size, device, cfg.train.precision.value,
                             Path(folder) / "eval_ref_logps.safetensors", values)
        del base
    held = evaluate(LossModule(model, step), examples, collate, cfg, device)
    return {k.removeprefix("eval/"): v for k, v in held.items()}


def gold_metrics(model, tokenizer, cfg, rows) -> tuple[dict, list]:
    """Completions (cfg.sample: greedy by default) of held-out prompts of a built-in task, judged by its gold
    judge; with the reference's (adapters off) beside them, and the policy's win-rate against it."""
    if cfg.data.task is None or method_record(cfg.method.name).head == "score":
        return {}, []
    judge = TASKS[cfg.data.task][1]
    rows = [r for _, r in rows][: cfg.sample.num_prompts]
    device = next(model.parameters()).device
    outputs = generate(model, tokenizer, [r["prompt"] for r in rows], cfg.sample, device, cfg.train.seed)
    scores = [judge(o, r["answer"]) for o, r in zip(outputs, rows)]
    metrics = {"gold/score": sum(scores) / len(scores)}
    samples = [{"prompt": r["prompt"], "completion": o, "gold": s} for r, o, s in zip(rows, outputs, scores)]
    if hasattr(model, "disable_adapter"):
        with reference_mode(model):
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
    log p - log p_ref) on completions sampled from the policy at eval.kl_temperature; reference = adapters off."""
    prompts = [p for _, r in rows if (p := row_prompt(r))][: cfg.sample.num_prompts]
    if method_record(cfg.method.name).head == "score" or not prompts or not hasattr(model, "disable_adapter"):
        return {}
    device, temperature = next(model.parameters()).device, cfg.eval.kl_temperature
    gen = generation_config(tokenizer, cfg.sample.max_new_tokens, temperature, top_k=0, top_p=1.0,  # the policy
                            merge=cfg.sample.merge_for_generation)
    torch.manual_seed(cfg.train.seed)
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(prompts), cfg.sample.batch_size):
            chunk = [prompt_ids(tokenizer, p) for p in prompts[i:i + cfg.sample.batch_size]]
            ids, attn, mask, _ = sample_responses(model, tokenizer, chunk, gen, device)
            logp = response_forward(model, ids, attn, mask.shape[1], temperature)[0]
            with reference_mode(model):
                ref = response_forward(model, ids, attn, mask.shape[1], temperature)[0]
            total += float(((logp - ref) * mask).sum())
    return {"kl_to_ref": total / len(prompts)}
