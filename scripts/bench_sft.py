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
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402

STEP1 = ("loss",)


def alignkit_child(args) -> dict:
    from alignkit.cli import main as cli_main

    run_dir = Path(args.run_dir)
    code = cli_main(["train", "method=sft", "adapter=lora", f"model.path={args.model}", "model.dtype=float32",
                     f"train.precision={args.precision}", f"data.path={args.data}", "data.eval_fraction=0",
                     f"data.max_length={args.max_length}", f"train.batch_size={args.batch_size}",
                     "train.max_steps=-1", "train.epochs=1", "train.warmup_ratio=0", "train.schedule=linear",
                     "train.shuffle=false", f"train.lr={args.lr}", "adapter.r=16", "adapter.alpha=32",
                     "adapter.dropout=0.0", f"train.gradient_checkpointing={args.ckpt[0] == 'on'}",
                     f"run.dir={run_dir}", *args.extra])
    if code:
        sys.exit(code)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"train_s": summary["train_seconds"], "peak_cuda_mb": summary.get("peak_cuda_mb"),
            "loss": lines[0]["loss"], "last_loss": lines[-1]["loss"]}


def trl_child(args) -> dict:
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    cuda = torch.cuda.is_available()
    rows = [json.loads(x) for x in Path(args.data).read_text().splitlines()]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    config = SFTConfig(
        output_dir=args.run_dir, bf16=args.precision == "bf16", fp16=False, use_cpu=not cuda,
        gradient_checkpointing=args.ckpt[0] == "on", per_device_train_batch_size=args.batch_size,
        num_train_epochs=1, learning_rate=args.lr, max_length=args.max_length, lr_scheduler_type="linear",
        warmup_steps=0, train_sampling_strategy="sequential", logging_steps=1, save_strategy="no", report_to=[],
        disable_tqdm=True, dataloader_num_workers=0, seed=42)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=AutoTokenizer.from_pretrained(args.model), peft_config=lora)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    out = trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h and "train_loss" not in h]
    return {"train_s": out.metrics["train_runtime"],
            "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
            "loss": logged[0]["loss"], "last_loss": logged[-1]["loss"]}


def task_flops(args, rows: list[dict]) -> tuple[float, int]:
    """(FLOPs of the task, real tokens): 4 x body params per token (forward, backward to the activations;
    LoRA's own weight gradients are negligible), + 6 x d x vocab per trained completion token."""
    from transformers import AutoTokenizer

    from alignkit.data.tokenize import encode_pair

    tok = AutoTokenizer.from_pretrained(args.model)
    n_body, d, vocab = bc.body_params(args.model)
    flops, tokens = 0.0, 0
    for row in rows:
        p, c = encode_pair(tok, row["prompt"], row["completion"])
        tokens += len(p) + len(c)
        flops += 4 * n_body * (len(p) + len(c)) + 6 * d * vocab * len(c)
    return flops, tokens


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="local model dir (default: the embedded SmolLM2-135M)")
    ap.add_argument("--rows", type=int, default=32, dest="n")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-4)
    bc.common_args(ap)
    args = ap.parse_args()
    bc.resolve_model(args)
    if args.child:
        args.precision = args.precision[0]
        print(json.dumps((alignkit_child if args.child == "alignkit" else trl_child)(args)))
        return 0
    args.own = []
    return bc.compare(args, __file__, "rows", task_flops, STEP1)


if __name__ == "__main__":
    sys.exit(main())
