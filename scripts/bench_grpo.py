#!/usr/bin/env python
"""GRPO + LoRA, alignkit vs TRL's GRPOTrainer (transformers generation, no vLLM) on the same work, side by side.

    python scripts/bench_grpo.py [--model DIR] [--steps 4] [--precision fp32 bf16] [--json out.json]

Same model (the embedded SmolLM2-135M-Instruct by default), same prompts (the built-in arithmetic_format task's, in
file order), same reward functions (alignkit's built-in correct_answer and answer_format, which TRL calls with its
own signature), same LoRA (r 16, alpha 32, all-linear, no dropout), 8 prompts x 4 completions of up to 64 new
tokens a step, temperature 1.0, one optimizer step per generation, TRL 1.16's loss defaults (dapo, beta 0, group
scaling), lr constant. Each side runs in its own process (peak RSS = that process's ru_maxrss); TRL with
activation checkpointing on (its default) and off, alignkit with its default (off). A step's time is split into
generation (sampling only) and the rest ("update": scoring, log-probs, forward/backward, optimizer); the first
step (warm-up) is left out of the means. Sampling is random on both sides, so completion lengths differ by chance:
generated tokens per second of sampling are printed next to the step times. Needs the `bench` extra (trl).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402

PROMPTS, GROUP, NEW_TOKENS = 8, 4, 64


def prompt_rows(n: int) -> list[dict]:
    from alignkit.data.tasks import arithmetic_format_rows

    return [{"prompt": r["prompt"], "answer": r["answer"]} for r in arithmetic_format_rows(n, 0)]


def summarise(step_s: list[float], gen_s: list[float], tokens: list[float]) -> dict:
    """Means over the steps after the first (a warm-up)."""
    keep = slice(1, None) if len(step_s) > 1 else slice(None)
    step, gen, tok = step_s[keep], gen_s[keep], tokens[keep]
    return {"step_s": sum(step) / len(step), "gen_s": sum(gen) / len(gen),
            "update_s": (sum(step) - sum(gen)) / len(step), "gen_tokens_per_s": sum(tok) / max(sum(gen), 1e-9),
            "steps": len(step_s)}


def alignkit_child(args) -> dict:
    """alignkit train in this process; each step timed around the method's rollout + update."""
    from dataclasses import replace

    from alignkit.methods import METHODS
    from alignkit.train import run_train
    from alignkit.methods import compose, validate

    record, marks = METHODS["grpo"], []

    def rollout(ctx, rows):
        marks.append(time.perf_counter())
        return record.rollout(ctx, rows)

    def update(ctx, batch, session, real):
        out = record.update(ctx, batch, session, real)
        marks.append(time.perf_counter())
        return out

    METHODS["grpo"] = replace(record, rollout=rollout, update=update)
    cfg = compose(["method=grpo", "adapter=lora", f"model.path={args.model}", "model.dtype=float32",
                   f"train.precision={args.precision}", f"data.path={args.data}", "data.eval_fraction=0",
                   "data.max_length=512", f"train.batch_size={PROMPTS}", f"method.num_generations={GROUP}",
                   f"method.max_new_tokens={NEW_TOKENS}", "method.temperature=1.0", f"train.max_steps={args.steps}",
                   "train.warmup_ratio=0", "train.schedule=constant", "train.shuffle=false", f"train.lr={args.lr}",
                   "adapter.r=16", "adapter.alpha=32", "adapter.dropout=0.0", "reward=functions",
                   f"train.gradient_checkpointing={args.ckpt[0] == 'on'}", f"run.dir={args.run_dir}", *args.extra])
    validate(cfg)
    run_train(cfg)
    lines = [json.loads(x) for x in (Path(args.run_dir) / "metrics.jsonl").read_text().splitlines()]
    step_s = [b - a for a, b in zip(marks[::2], marks[1::2])]
    gen_s = [x["time/generation"] for x in lines]
    tokens = [x["completions/mean_length"] * PROMPTS * GROUP for x in lines]
    return summarise(step_s, gen_s, tokens) | {"mean_length": sum(x["completions/mean_length"] for x in lines) / len(lines)}


def trl_child(args) -> dict:
    """TRL's GRPOTrainer in this process; generation timed around its _generate, steps by a callback."""
    import datasets
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from alignkit.scoring.builtin import answer_format, correct_answer

    rows = [json.loads(x) for x in Path(args.data).read_text().splitlines()]
    marks, gen = [], []

    class Steps(TrainerCallback):
        def on_step_begin(self, *a, **k):
            marks.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            marks.append(time.perf_counter())

    config = GRPOConfig(
        output_dir=args.run_dir, bf16=args.precision == "bf16", fp16=False, use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=args.ckpt[0] == "on", per_device_train_batch_size=PROMPTS * GROUP,
        num_generations=GROUP, max_completion_length=NEW_TOKENS, temperature=1.0, learning_rate=args.lr,
        lr_scheduler_type="constant", max_steps=args.steps, logging_steps=1, save_strategy="no", report_to=[],
        disable_tqdm=True, seed=42, shuffle_dataset=False, dataloader_num_workers=0)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32),
                          reward_funcs=[correct_answer, answer_format], args=config,
                          train_dataset=datasets.Dataset.from_list(rows),
                          processing_class=AutoTokenizer.from_pretrained(args.model), peft_config=lora,
                          callbacks=[Steps()])
    real_generate = trainer._generate

    def timed(*a, **k):
        t0 = time.perf_counter()
        out = real_generate(*a, **k)
        gen.append(time.perf_counter() - t0)
        return out

    trainer._generate = timed
    trainer.train()
    logs = [h for h in trainer.state.log_history if "completions/mean_length" in h]
    step_s = [b - a for a, b in zip(marks[::2], marks[1::2])]
    tokens = [h["completions/mean_length"] * PROMPTS * GROUP for h in logs]
    return summarise(step_s, gen, tokens) | {"mean_length": sum(h["completions/mean_length"] for h in logs) / len(logs)}


def child_cmd(args, side: str, precision: str, ckpt: str, data: Path, run_dir: Path) -> list[str]:
    return [sys.executable, __file__, "--child", side, "--precision", precision, "--ckpt", ckpt, "--data", str(data),
            "--run-dir", str(run_dir), "--model", args.model, "--steps", str(args.steps), "--lr", str(args.lr),
            *[f"--extra={e}" for e in args.extra]]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per run (the first is not timed)")
    ap.add_argument("--lr", type=float, default=1e-5)
    bc.common_args(ap)
    args = bc.dispatch(ap, alignkit_child, trl_child)
    if args is None:
        return 0
    report = {"model": args.model, "prompts": PROMPTS, "group": GROUP, "new_tokens": NEW_TOKENS, "steps": args.steps,
              "threads": torch.get_num_threads(), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        data = bc.write_jsonl(prompt_rows(PROMPTS * args.steps), Path(tmp) / "prompts.jsonl")
        for precision in args.precision:
            sides = [("alignkit", "off")] + ([] if args.skip_trl else [("trl", c) for c in args.ckpt])
            runs = []
            for side, ckpt in sides:
                r = bc.run_child(child_cmd(args, side, precision, ckpt, data, Path(tmp) / f"{side}-{precision}-{ckpt}"))
                r.update(side=side, precision=precision, ckpt=ckpt, steps_per_s=1 / r["step_s"])
                runs.append(r)
            ours, trl = runs[0], runs[1:]
            for t in trl:
                t["ours_speedup"] = ours["steps_per_s"] / t["steps_per_s"]
                t["ours_rss_ratio"] = ours["peak_rss_mb"] / t["peak_rss_mb"]
            report["runs"] += runs
            bc.print_table(f"{precision}: {PROMPTS} prompts x {GROUP} completions, <= {NEW_TOKENS} new tokens, "
                           f"{args.steps} steps (first not timed), {torch.get_num_threads()} threads",
                           [(f"{r['side']} ckpt={r['ckpt']}",
                             [bc.fmt(r["step_s"], 1), bc.fmt(r["gen_s"], 1), bc.fmt(r["update_s"], 1),
                              bc.fmt(r["steps_per_s"], 4), bc.fmt(r["gen_tokens_per_s"], 1), bc.fmt(r["mean_length"], 1),
                              bc.fmt(r["peak_rss_mb"], 0)]) for r in runs],
                           ["step s", "gen s", "update s", "steps/s", "gen tok/s", "mean len", "RSS MB"])
            for t in trl:
                print(f"alignkit vs TRL ckpt={t['ckpt']} ({precision}): {t['ours_speedup']:.2f}x its steps/s, "
                      f"{t['ours_rss_ratio']:.2f}x its peak RSS")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
