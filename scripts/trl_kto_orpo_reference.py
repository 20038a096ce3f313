#!/usr/bin/env python
r"""Reference numbers from TRL's ``KTOTrainer`` and ``ORPOTrainer`` (``trl.experimental.orpo``) for the first
optimizer steps, to compare alignkit's KTO and ORPO against (``scripts/compare_trl.py --method kto|orpo``).

Standalone on the TRL side like ``trl_dpo_reference.py`` (torch / transformers / peft / trl / datasets, never
alignkit), whose row reading and offline settings it shares. Usage::

    python scripts/trl_kto_orpo_reference.py --method kto|orpo --model DIR --data FILE.jsonl --out OUT.json \
        [--steps 2] [--lr 1e-4] [--beta 0.1] [--max-length 256] [--no-lora] [--lora-r 16] [--lora-alpha 32]

KTO rows are ``{prompt, completion, label}``; ORPO rows ``{prompt, chosen, rejected}`` (ORPOTrainer tokenizes
with the legacy rules: it prepends the BOS id to a prompt that does not start with it and appends the EOS id to
an answer that does not end with it, so rows written as ChatML strings give the ids alignkit makes).

One batch = the whole file (``per_device_train_batch_size`` = rows), and each of the ``--steps`` steps sees it
again: KTOTrainer samples in file order (its KL pairs, each prompt with the completion before it, are built over
that batch), ORPO's single batch is the file whatever the sampler. fp32 (``bf16=False``), no gradient
checkpointing, dropout off, AdamW with lr decaying linearly over the steps (no warm-up), max_grad_norm 1.0.
Full fine-tuning (``--no-lora``): KTOTrainer loads a second copy as its reference. LoRA: r, alpha, dropout 0 on
all linear layers; its random A makes only step 1 comparable.

Output JSON: "steps": TRL's logged numbers of each step (the step's metrics are computed before its update);
"rows": per row the token ids and completion masks TRL trains on after truncation (KTO: "input_ids", "mask",
"kl_input_ids", "kl_mask", "label"; ORPO: "chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask", masks from
its labels, which exclude the prompt); "trl_version".
"""
import argparse
import contextlib
import json
import sys
import tempfile

from trl_dpo_reference import load_rows, log  # also sets the offline environment before transformers loads

import datasets  # noqa: E402
import torch  # noqa: E402
import trl  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", choices=["kto", "orpo"], required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--no-lora", action="store_true")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--seed", type=int, default=42)
    return p.parse_args(argv)


def cut(ids, mask, max_length):
    return list(ids)[:max_length], list(mask)[:max_length]


def kto_rows(ds, max_length) -> list[dict]:
    out = []
    for ex in ds:
        p, c, kl = ex["prompt_ids"], ex["completion_ids"], ex["KL_completion_ids"]
        ids, mask = cut(p + c, [0] * len(p) + [1] * len(c), max_length)
        kl_ids, kl_mask = cut(p + kl, [0] * len(p) + [1] * len(kl), max_length)
        out.append({"input_ids": ids, "mask": mask, "kl_input_ids": kl_ids, "kl_mask": kl_mask,
                    "label": bool(ex["label"])})
    return out


def orpo_rows(ds) -> list[dict]:
    out = []
    for ex in ds:
        out.append({})
        for side in ("chosen", "rejected"):
            out[-1][f"{side}_ids"] = list(ex[f"{side}_input_ids"])
            out[-1][f"{side}_mask"] = [int(t != -100) for t in ex[f"{side}_labels"]]
    return out


def run(args) -> dict:
    rows = load_rows(args.data)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    peft_config = None if args.no_lora else LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                                                       target_modules="all-linear", task_type="CAUSAL_LM")
    common = dict(output_dir=tempfile.mkdtemp(prefix=f"trl_{args.method}_ref_"), bf16=False, fp16=False,
                  use_cpu=True, gradient_checkpointing=False, per_device_train_batch_size=len(rows),
                  gradient_accumulation_steps=1, max_steps=args.steps, logging_steps=1, report_to=[],
                  save_strategy="no", learning_rate=args.lr, lr_scheduler_type="linear", warmup_steps=0,
                  beta=args.beta, max_length=args.max_length, disable_dropout=True, seed=args.seed,
                  dataloader_num_workers=0, disable_tqdm=True)
    train = datasets.Dataset.from_list(rows)
    if args.method == "kto":
        config = trl.KTOConfig(**common, loss_type="kto")
        trainer = trl.KTOTrainer(model=model, args=config, train_dataset=train, processing_class=tokenizer,
                                 peft_config=peft_config)
        token_rows = kto_rows(trainer.train_dataset, args.max_length)
    else:
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        trainer = ORPOTrainer(model=model, args=ORPOConfig(**common), train_dataset=train, processing_class=tokenizer,
                              peft_config=peft_config)
        token_rows = orpo_rows(trainer.train_dataset)
    if len(trainer.train_dataset) != len(rows):
        raise SystemExit(f"TRL dropped {len(rows) - len(trainer.train_dataset)} row(s): the batch is not the file")
    trainer.train()
    steps = [h for h in trainer.state.log_history if "loss" in h and "train_loss" not in h]
    if [h["step"] for h in steps] != list(range(1, args.steps + 1)):
        raise SystemExit(f"expected one log line per step: {trainer.state.log_history}")
    log(f"{args.method}: {len(rows)} rows, {args.steps} steps, trl {trl.__version__}")
    return {"steps": steps, "rows": token_rows, "trl_version": trl.__version__}


def main(argv=None):
    args = parse_args(argv)
    with contextlib.redirect_stdout(sys.stderr):  # the Trainer prints its logs to stdout
        result = run(args)
    with open(args.out, "w") as f:
        json.dump(result, f)
    return result


if __name__ == "__main__":
    main()
