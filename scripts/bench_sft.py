#!/usr/bin/env python
"""SFT + LoRA, alignkit vs TRL's SFTTrainer on the same work, side by side.

    python scripts/bench_sft.py [--model DIR] [--rows 32] [--precision fp32 bf16] [--json out.json]

Same model (the embedded SmolLM2-135M-Instruct by default), same conversational prompt-completion rows
(varied lengths, all within max_length), completion-only loss (TRL's default for such rows), same LoRA
(r 16, alpha 32, all-linear, no dropout), batch 8, lr, linear schedule without warm-up, data in file order;
one epoch. Each side runs in its own process. TRL runs with activation checkpointing on (its default) and
off; alignkit too. fp32 compares against TRL bf16=False, bf16 against TRL's default bf16 autocast. The
step-1 loss must agree in fp32 (relative 1e-4), or the comparison is void (exit 1). Needs the `bench`
extra (trl).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402

STEP1 = ("loss",)


def alignkit_child(args) -> dict:
    lines, summary = bc.run_alignkit(args, "method=sft")
    return {**bc.alignkit_times(summary),
            "loss": lines[0]["loss"], "last_loss": lines[-1]["loss"]}


def trl_child(args) -> dict:
    from trl import SFTConfig, SFTTrainer

    trainer, out = bc.run_trl(args, SFTTrainer, SFTConfig)
    logged = [h for h in trainer.state.log_history if "loss" in h and "train_loss" not in h]
    return {**out, "loss": logged[0]["loss"], "last_loss": logged[-1]["loss"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=32, dest="n")
    ap.add_argument("--lr", type=float, default=1e-4)
    bc.common_args(ap)
    args = bc.dispatch(ap, alignkit_child, trl_child)
    if args is None:
        return 0
    args.own = []
    return bc.compare(args, __file__, "rows", lambda a, rows: bc.task_flops(a, rows, ("completion",), 4), STEP1)


if __name__ == "__main__":
    sys.exit(main())
