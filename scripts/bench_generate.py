#!/usr/bin/env python
"""Generation speed: transformers' generate vs alignkit's rollout decoder, against the memory-bound ceiling.

    python scripts/bench_generate.py [--model DIR] [--batch 1 8 32] [--new-tokens 64] [--precision fp32 bf16]
                                     [--repeats 3] [--quick] [--threads N] [--json out.json]

Decoding is memory-bound in principle: each generated position reads every weight once for the whole batch, so a
step takes at least weight bytes / memory bandwidth. The ceiling (tokens/s = batch x bandwidth / weight bytes)
uses a copy bandwidth measured in the same process just before the timings (bytes read + written per second by
copying a 256 MB tensor, best of 5, the same thread count). The policy is the embedded SmolLM2-135M-Instruct with
a LoRA r16 adapter on every linear layer (B moved off zero so it counts), sampled at temperature 0.7 with EOS
ignored (every row generates --new-tokens). Per precision and batch, one child process (its own peak RSS) times:
transformers' generate (the unmerged peft model), alignkit's decoder (generation/decode.py) with the adapter
unmerged and merged for sampling (generation/merge.py, as method.merge_for_generation=true does), taking turns
within each repeat after one untimed round; tokens/s from each one's fastest repeat (the least disturbed on
shared cores). --quick: one timed repeat, for a check that the script runs end to end.

"matmuls" is a second, tighter ceiling measured in the same child: batch / the seconds that one step's weight
matmuls alone take with this machine's kernels (F.linear at that batch over every weight). On a CPU a batch-8
step's skinny fp32 GEMMs stream the weights well below the copy bandwidth, and bf16 ones far below (no bf16
instructions on AVX2): the gap between the two ceilings is the kernels', the gap below "matmuls" the decoder's.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench_common as bc  # noqa: E402

WORDS = "Write one sentence about the river, the model and the memory of a long summer day".split()
ROWS = ("transformers generate", "alignkit, unmerged", "alignkit, merged")


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


def matmul_seconds(model, batch: int, repeats: int = 3) -> float:
    """Seconds one decoding step's weight matmuls take at this batch with this machine's kernels (F.linear of a
    (batch, in) input with every 2-D weight of the base model, the tied head once), best of `repeats`."""
    import torch.nn.functional as F

    weights = [p for p in model.get_base_model().parameters() if p.dim() == 2]
    inputs = [torch.randn(batch, w.shape[1], dtype=w.dtype) for w in weights]
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats):
            started = time.perf_counter()
            for x, w in zip(inputs, weights):
                F.linear(x, w)
            best = min(best, time.perf_counter() - started)
    return best


def policy(model_dir: str, dtype: torch.dtype):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    weights = sum(p.numel() for p in model.parameters())  # each read once per step
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    return model.eval(), AutoTokenizer.from_pretrained(model_dir), weights


def child(args) -> dict:
    """One precision and batch: seconds of each row's fastest repeat, the bandwidth, the weight bytes."""
    from transformers import GenerationConfig

    from alignkit.generation.decode import Sampling, decode
    from alignkit.generation.merge import merged
    from alignkit.generation.sample import left_pad, prompt_ids

    dtype = torch.float32 if args.precision[0] == "fp32" else torch.bfloat16
    model, tokenizer, weights = policy(args.model, dtype)
    batch, n = args.batch[0], args.new_tokens
    ids, attn = left_pad([prompt_ids(tokenizer, " ".join(WORDS[: 6 + (i * 5) % 10])) for i in range(batch)],
                         tokenizer.pad_token_id, "cpu")
    gen = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=True, temperature=0.7, top_k=0, top_p=1.0,
                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, use_cache=True)
    s = Sampling(n, 0.7, 0, 1.0, eos=(), pad=tokenizer.pad_token_id)

    def merged_decode():
        with merged(model, True):
            decode(model, ids, attn, s)

    runs = {ROWS[0]: lambda: model.generate(input_ids=ids, attention_mask=attn, generation_config=gen),
            ROWS[1]: lambda: decode(model, ids, attn, s), ROWS[2]: merged_decode}
    bandwidth, matmuls = copy_bandwidth(), matmul_seconds(model, batch)
    best = {name: float("inf") for name in runs}
    with torch.no_grad():
        for repeat in range(args.repeats + 1):  # round 0: untimed warm-up
            for name, fn in runs.items():
                started = time.perf_counter()
                fn()
                if repeat:
                    best[name] = min(best[name], time.perf_counter() - started)
    return {"seconds": best, "bandwidth": bandwidth, "matmul_s": matmuls, "weights": weights,
            "weight_bytes": weights * dtype.itemsize, "threads": torch.get_num_threads()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="local model dir (default: the embedded SmolLM2-135M)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="one timed repeat (a check that it runs end to end)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    bc.resolve_model(args)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    repeats = 1 if args.quick else args.repeats
    report = {"model": args.model, "new_tokens": args.new_tokens, "repeats": repeats, "runs": []}
    for precision in args.precision:
        table = []
        for batch in args.batch:
            cmd = [sys.executable, __file__, "--child", "--model", args.model, "--batch", str(batch), "--precision",
                   precision, "--new-tokens", str(args.new_tokens), "--repeats", str(repeats),
                   *(["--threads", str(args.threads)] if args.threads else [])]
            r = bc.run_child(cmd)
            ceiling = batch * r["bandwidth"] / r["weight_bytes"]
            roofline = batch / r["matmul_s"]  # the step's matmuls alone, nothing else
            generate = batch * args.new_tokens / r["seconds"][ROWS[0]]
            for name in ROWS:
                rate = batch * args.new_tokens / r["seconds"][name]
                report["runs"].append({"precision": precision, "batch": batch, "what": name, "tokens_per_s": rate,
                                       "of_ceiling": rate / ceiling, "vs_generate": rate / generate,
                                       "ceiling_tokens_per_s": ceiling, "copy_bandwidth_gb_s": r["bandwidth"] / 1e9,
                                       "matmuls_only_tokens_per_s": roofline, "of_matmuls_only": rate / roofline,
                                       "weight_gb": r["weight_bytes"] / 1e9, "threads": r["threads"],
                                       "child_peak_rss_mb": r["peak_rss_mb"]})
                table.append((f"batch {batch:>3}  {name}", [bc.fmt(rate, 1), f"{rate / generate:.2f}x",
                                                            f"{rate / ceiling:.1%}", bc.fmt(ceiling, 0),
                                                            f"{rate / roofline:.1%}", bc.fmt(roofline, 0)]))
            print(f"  ({precision}, batch {batch}: copy bandwidth {r['bandwidth'] / 1e9:.1f} GB/s, weights "
                  f"{r['weight_bytes'] / 1e9:.2f} GB, the step's matmuls alone {r['matmul_s'] * 1e3:.1f} ms, "
                  f"{r['threads']} threads, child peak RSS "
                  f"{r['peak_rss_mb']:.0f} MB)", flush=True)
        bc.print_table(f"{precision}: {args.new_tokens} new tokens, temperature 0.7, LoRA r16 all-linear, best of "
                       f"{repeats}", table, ["tokens/s", "vs generate", "of ceiling", "ceiling tok/s", "of matmuls",
                        "matmuls tok/s"])
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
