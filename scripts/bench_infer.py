#!/usr/bin/env python
"""Inference latency of the LoRA family: greedy generation tokens/s of the base, the unmerged LoRA and DoRA
adapters (peft, as `alignkit train` leaves them) and their merged `alignkit export`s, side by side.

    python scripts/bench_infer.py [--model DIR] [--batch 1 8] [--new-tokens 64] [--repeats 7] [--threads N]
                                  [--json out.json]

The embedded SmolLM2-135M-Instruct by default, fp32, the KV cache on. Two short runs are trained first
(`alignkit train method=sft adapter=lora|dora`, 2 steps: the weights do not matter for speed, only the
shapes) and exported (`alignkit export`, fp32). Every model generates exactly --new-tokens tokens (EOS
ignored) for the same left-padded chat prompts; the variants take turns within each repeat (one untimed
round first). Tokens/s come from each variant's fastest repeat (on shared cores the fastest run is the least
disturbed; the JSON also has the medians), with the ratio to the base measured in the same run; a second copy
of the base shows how far two identical models differ here. A variant over 4x slower than the base
(unmerged DoRA on a CPU) is timed in the first 3 repeats only. The merged exports must give the
unmerged adapters' greedy tokens (checked; exit 1 otherwise).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402

SLOW, SLOW_REPEATS = 4.0, 3  # a variant over 4x the base's time is timed 3 times only
PROMPTS = ["What is 17 * 23?", "Name three rivers in Europe.", "Explain why the sky is blue.",
           "Write a haiku about rain.", "What is 144 / 12?", "Give a synonym for quick.",
           "Summarise the plot of a heist film.", "List two prime numbers above 50."]


def train_and_export(model: str, adapter: str, root: Path) -> tuple[Path, Path]:
    from alignkit.export.run import run_export
    from alignkit.methods import compose as compose_config
    from alignkit.train import execute, prepare_run

    run_dir = root / adapter
    cfg = compose_config([f"model.path={model}", "method=sft", f"adapter={adapter}", "train.max_steps=2",
                          "data.limit=16", "data.max_length=128", f"run.dir={run_dir}"])
    execute(prepare_run(cfg))
    run_export([f"run={run_dir}", "export.dtype=float32"])
    return run_dir, run_dir / "export"


def load_variants(model: str, root: Path) -> dict:
    from transformers import AutoModelForCausalLM

    from alignkit.runs.read import load_run

    variants = {"base": AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32),
                # the same model again: how far two identical models' timings differ here (the noise band)
                "base (second copy)": AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)}
    for adapter in ("lora", "dora"):
        run_dir, export = train_and_export(model, adapter, root)
        variants[f"{adapter} (unmerged peft)"] = load_run(run_dir, torch.device("cpu"))[0]
        variants[f"{adapter} merged (export)"] = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
    for m in variants.values():
        m.eval()
        m.config.use_cache = True
    return variants


def generate(model, inputs: dict, gen) -> tuple[torch.Tensor, float]:
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**inputs, generation_config=gen)
    return out, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="local model dir (default: the embedded SmolLM2-135M)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    bc.resolve_model(args)
    from transformers import AutoTokenizer, GenerationConfig

    from alignkit.generation.sample import left_pad, prompt_ids

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    gen = GenerationConfig(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                           use_cache=True, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    with tempfile.TemporaryDirectory() as root:
        variants = load_variants(args.model, Path(root))
        results, ok = {}, True
        for batch in args.batch:
            ids, mask = left_pad([prompt_ids(tokenizer, p) for p in (PROMPTS * batch)[:batch]],
                                 gen.pad_token_id, "cpu")
            inputs = {"input_ids": ids, "attention_mask": mask}
            times = {name: [] for name in variants}
            tokens, warm = {}, {}
            for repeat in range(args.repeats + 1):  # the first round warms up
                for name, model in variants.items():
                    if repeat > SLOW_REPEATS and warm[name] > SLOW * warm["base"]:
                        continue  # far slower than the base (unmerged DoRA): a few timings settle its ratio
                    out, seconds = generate(model, inputs, gen)
                    tokens[name] = out[:, ids.shape[1]:]
                    if repeat:
                        times[name].append(seconds)
                    else:
                        warm[name] = seconds
            for adapter in ("lora", "dora"):
                same = torch.equal(tokens[f"{adapter} (unmerged peft)"], tokens[f"{adapter} merged (export)"])
                ok &= same
                print(f"batch {batch}: {adapter} merged export gives the unmerged adapter's greedy tokens: {same}")
            base = min(times["base"])
            results[batch] = {name: {"best_s": min(t), "median_s": statistics.median(t), "timings": len(t),
                                     "tokens_per_s": batch * args.new_tokens / min(t), "vs_base": base / min(t)}
                              for name, t in times.items()}
    header = [f"b{b} tok/s" for b in args.batch] + [f"b{b} vs base" for b in args.batch]
    rows = [(name, [bc.fmt(results[b][name]["tokens_per_s"], 1) for b in args.batch] +
             [bc.fmt(results[b][name]["vs_base"], 3) for b in args.batch]) for name in variants]
    bc.print_table(f"greedy generation, {args.new_tokens} new tokens, fp32, {torch.get_num_threads()} threads, "
                   f"best of {args.repeats} repeats", rows, header)
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "new_tokens": args.new_tokens,
                                               "results": results}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
