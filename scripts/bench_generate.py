#!/usr/bin/env python
"""Generation speed: transformers' generate vs alignkit's rollout decoder, against the memory-bound ceiling.

    python scripts/bench_generate.py [--model DIR] [--batch 1 8 32] [--new-tokens 64] [--precision fp32 bf16]
                                     [--threads N] [--json out.json]

Decoding is memory-bound: each generated position reads every weight once for the whole batch, so a step takes
at least weight bytes / memory bandwidth. The ceiling (tokens/s = batch / that time) uses a copy bandwidth
measured in the same run (bytes read + written by a large tensor copy, per second). The policy is the embedded
SmolLM2-135M-Instruct with a LoRA r16 adapter (all linear layers, B moved off zero so it counts), sampled at
temperature 0.7, no EOS stop (every row generates --new-tokens). Rows: transformers' generate (unmerged
adapter), alignkit's decoder with the adapter unmerged and merged into the weights (peft merge_adapter), and
the ceiling. Best of --repeats timings per row.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def copy_bandwidth(repeats: int = 5, size: int = 256 << 20) -> float:
    """Bytes moved per second (read + write) by copying a `size`-byte tensor, best of `repeats`."""
    src = torch.empty(size // 4, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - started)
    return 2 * size / best


def policy(model_dir: str, dtype: torch.dtype):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    return model.eval(), AutoTokenizer.from_pretrained(model_dir)


def prompts(tokenizer, batch: int) -> list[list[int]]:
    from alignkit.generation.sample import prompt_ids

    words = "Write one sentence about the river, the model and the memory of a long summer day".split()
    return [prompt_ids(tokenizer, " ".join(words[: 6 + (i * 5) % 10])) for i in range(batch)]


def timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import GenerationConfig

    from alignkit.generation.decode import Sampling, decode
    from alignkit.generation.sample import left_pad
    from alignkit.models.load import resolve_model_dir

    model_dir = args.model or resolve_model_dir("alignkit:smollm2-135m-instruct")
    bandwidth = copy_bandwidth()
    report = {"model": model_dir, "new_tokens": args.new_tokens, "threads": torch.get_num_threads(),
              "copy_bandwidth_gb_s": bandwidth / 1e9, "rows": []}
    print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s, {torch.get_num_threads()} threads")
    for precision in args.precision:
        dtype = torch.float32 if precision == "fp32" else torch.bfloat16
        model, tokenizer = policy(model_dir, dtype)
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        s = Sampling(args.new_tokens, 0.7, 0, 1.0)
        gen = GenerationConfig(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=True,
                               temperature=0.7, top_k=0, top_p=1.0, pad_token_id=tokenizer.pad_token_id,
                               eos_token_id=tokenizer.eos_token_id, use_cache=True)
        for batch in args.batch:
            ids, attn = left_pad(prompts(tokenizer, batch), tokenizer.pad_token_id, "cpu")
            tokens = batch * args.new_tokens
            rows = {}
            with torch.no_grad():
                rows["transformers generate"] = timed(lambda: model.generate(input_ids=ids, attention_mask=attn,
                                                                             generation_config=gen), args.repeats)
                rows["alignkit decoder, unmerged"] = timed(lambda: decode(model, ids, attn, s, -1, 0), args.repeats)
                model.merge_adapter()
                rows["alignkit decoder, merged"] = timed(lambda: decode(model, ids, attn, s, -1, 0), args.repeats)
                model.unmerge_adapter()
            ceiling = batch * bandwidth / weight_bytes
            print(f"\n{precision}, batch {batch}, {args.new_tokens} new tokens; weights {weight_bytes / 1e9:.2f} GB, "
                  f"ceiling {ceiling:.0f} tokens/s")
            for name, seconds in rows.items():
                rate = tokens / seconds
                print(f"  {name:<28} {rate:8.1f} tokens/s  {rate / ceiling:6.1%} of ceiling  "
                      f"{rate / (tokens / rows['transformers generate']):5.2f}x generate")
                report["rows"].append({"precision": precision, "batch": batch, "what": name, "tokens_per_s": rate,
                                       "of_ceiling": rate / ceiling, "ceiling": ceiling})
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
