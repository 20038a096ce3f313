#!/usr/bin/env python
"""What each DPO lever buys: one batch of pairs, reference forward + policy forward/backward, per layout.

    python scripts/bench_levers.py [--model DIR] [--pairs 8] [--repeats 3] [--json out.json]

Levers, each added to the ones before, each in its own process (peak RSS is its own):
  padded     2n right-padded rows, the LM head from the first completion column on (alignkit before issue 9)
  free       + glibc returns freed blocks to the OS at once (ALIGNKIT_RETURN_MEMORY=1; off by default)
  head       + the LM head only on counted tokens, in chunks recomputed in backward
  shared     + each prompt once for its chosen and rejected answers (one pair per row)
  packed     + pairs packed first-fit into rows (padding-free): train.packing=true
  ckpt       + activation checkpointing (train.gradient_checkpointing=true)
Time: the best of --repeats steps after one warm-up. Same LoRA as bench_dpo.py (r 16, all-linear).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402

LAYOUTS = ["padded", "free", "head", "shared", "packed", "ckpt"]


def one_per_row(lengths: list[int]) -> tuple[list[tuple[int, int]], int, int]:
    return [(i, 0) for i in range(len(lengths))], len(lengths), max(lengths)


def make_batch(layout: str, examples: list[dict], pad_id: int) -> dict:
    import alignkit.data.packing as packing
    from alignkit.data.collate import collate_preference

    if layout in ("padded", "free"):
        return collate_preference(examples, pad_id)
    if layout in ("head", "shared"):
        packing.first_fit = one_per_row
    batch = collate_preference(examples, pad_id)
    units = ([[e["chosen"]] for e in examples] + [[e["rejected"]] for e in examples] if layout == "head"
             else [[e["chosen"], e["rejected"]] for e in examples])
    batch["packed"] = packing.pack(units, pad_id)
    return batch


def child(args) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignkit.adapters.reference import reference_mode
    from alignkit.data.tokenize import encode_pair
    from alignkit.forward.logps import sequence_logps
    from alignkit.session.resources import return_freed_memory

    if args.child != "padded":
        return_freed_memory()
    tok = AutoTokenizer.from_pretrained(args.model)
    examples = []
    for row in bc.pair_rows(args.pairs, 0, tok, 256):
        ex = {}
        for side in ("chosen", "rejected"):
            p, c = encode_pair(tok, row["prompt"], row[side])
            ex[side] = {"input_ids": p + c, "completion_mask": [0] * len(p) + [1] * len(c)}
        examples.append(ex)
    batch = make_batch("packed" if args.child == "ckpt" else args.child, examples, tok.pad_token_id)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    if args.child == "ckpt":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    model.train()
    times = []
    for _ in range(args.repeats + 1):
        t0 = time.perf_counter()
        with torch.no_grad(), reference_mode(model):
            ref = sequence_logps(model, batch)[0]
        policy = sequence_logps(model, batch)[0]
        (policy - ref).sum().backward()
        times.append(time.perf_counter() - t0)
    rows = batch["packed"]["input_ids"] if "packed" in batch else batch["input_ids"]
    return {"step_s": min(times[1:]), "positions": rows.numel(), "rows": rows.shape[0],
            "logps_sum": float(policy.sum())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layouts", nargs="+", default=LAYOUTS, choices=LAYOUTS)
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", choices=LAYOUTS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    bc.resolve_model(args)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    runs = {}
    for layout in args.layouts:
        runs[layout] = bc.run_child([sys.executable, __file__, "--child", layout, "--model", args.model,
                                     "--pairs", str(args.pairs), "--repeats", str(args.repeats)])
    base = runs[args.layouts[0]]
    bc.print_table(f"DPO step on {args.pairs} pairs (reference fwd + policy fwd/bwd), fp32, LoRA r16",
                   [(k, [r["rows"], r["positions"], bc.fmt(r["step_s"], 2), bc.fmt(base["step_s"] / r["step_s"], 2),
                         bc.fmt(r["peak_rss_mb"], 0), bc.fmt(r["logps_sum"], 4)]) for k, r in runs.items()],
                   ["rows", "positions", "step s", "speed-up", "RSS MB", "sum logps"])
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
