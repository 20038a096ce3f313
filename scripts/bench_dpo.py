#!/usr/bin/env python
"""DPO + LoRA, alignkit vs TRL's DPOTrainer on the same work, side by side.

    python scripts/bench_dpo.py [--model DIR] [--pairs 32] [--precision fp32 bf16] [--json out.json]

Same model (the embedded SmolLM2-135M-Instruct by default), same conversational pairs (varied lengths,
all within max_length), same LoRA (r 16, alpha 32, all-linear, no dropout), batch 8 pairs, lr, beta,
linear schedule without warm-up, data in file order (TRL: train_sampling_strategy=sequential, alignkit:
train.shuffle=false) so both see the same step-1 batch; one epoch. Each side runs in its own process
(peak RSS = that process's ru_maxrss). TRL runs with activation checkpointing on (its default) and off;
its faster time and its lower memory are the baseline. fp32 compares against TRL with bf16=False; bf16
against TRL's default bf16=True autocast (alignkit train.precision=bf16). Step-1 loss and log-probs must
agree in fp32 (relative 1e-4), or the comparison is void (exit 1). Needs the `bench` extra (trl).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402

STEP1 = ("loss", "logps/chosen", "logps/rejected")


def alignkit_child(args) -> dict:
    lines, summary = bc.run_alignkit(args, "method=dpo", f"method.beta={args.beta}")
    return {**bc.alignkit_times(summary),
            **{k: lines[0][k] for k in STEP1}}


def trl_child(args) -> dict:
    from trl import DPOConfig, DPOTrainer

    trainer, out = bc.run_trl(args, DPOTrainer, DPOConfig, beta=args.beta)
    first = next(h for h in trainer.state.log_history if h.get("step") == 1 and "loss" in h)
    return {**out, **{k: first[k] for k in STEP1}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=32, dest="n")
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--beta", type=float, default=0.1)
    bc.common_args(ap)
    args = bc.dispatch(ap, alignkit_child, trl_child)
    if args is None:
        return 0
    args.own = ["--beta", str(args.beta)]
    return bc.compare(args, __file__, "pairs", lambda a, rows: bc.task_flops(a, rows, ("chosen", "rejected"), 6), STEP1)


if __name__ == "__main__":
    sys.exit(main())
