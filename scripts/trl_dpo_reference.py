#!/usr/bin/env python
r"""Reference numbers from TRL's ``DPOTrainer`` for ONE optimizer step (to compare alignkit's DPO against).

Standalone on purpose: imports only torch / transformers / peft / trl / datasets / json / argparse (never alignkit).

Usage::

    python scripts/trl_dpo_reference.py --model DIR --data FILE.jsonl --beta 0.1 --lr 1e-4 \
        [--batch-size N] --max-length 256 --lora-r 16 --lora-alpha 32 [--no-lora] --out OUT.json

``DIR`` is a local HF model dir (safetensors + tokenizer, with a chat template for conversational data).
``FILE.jsonl`` rows are TRL preference rows, either conversational
``{"prompt": [messages], "chosen": [messages], "rejected": [messages]}`` or plain strings
``{"prompt": str, "chosen": str, "rejected": str}``; without "prompt" (in the first row) TRL extracts the
implicit prompt (``extract_prompt``), and "tools" / "chat_template_kwargs" columns reach the chat template.

One batch = the whole file
--------------------------
The entire data file is ONE batch: ``per_device_train_batch_size`` = number of rows, ``max_steps=1``,
``gradient_accumulation_steps=1``. TRL's sampler shuffles, but since every row is in the single step, only the
order inside the batch changes, and every metric is a mean over rows, so the order does not matter.
``--batch-size`` may be omitted (it then defaults to the row count); if given it MUST equal the row count,
otherwise the script exits with an error (with a smaller batch, which rows land in step 1 would depend on the
sampler seed). TRL also silently drops rows whose prompt alone is >= max_length; the script errors out if that
happens, so the batch is always exactly the file.

Config used (TRL 1.16 / transformers 5.x)
-----------------------------------------
``DPOConfig(bf16=False, fp16=False, use_cpu=True, gradient_checkpointing=False, per_device_train_batch_size=N,
max_steps=1, logging_steps=1, report_to=[], save_strategy="no", learning_rate=lr, beta=beta,
loss_type="sigmoid", max_length=max_length, disable_dropout=True, seed=seed)``. Everything else is the
``TrainingArguments`` default, which matters when comparing the *update* (not the step-1 metrics):
optim "adamw_torch_fused" (AdamW), betas (0.9, 0.999), eps 1e-8, weight_decay 0.0, lr scheduler "linear" with 0
warmup (step 1 uses the full lr, which is also what is logged as learning_rate), and **max_grad_norm=1.0
(gradient clipping on; the logged grad_norm is the pre-clipping norm)**. Note Adam's first step is
~lr*sign(grad) per parameter (bias-corrected m/sqrt(v)), so clipping barely changes step 1 except through eps.
NB: TRL 1.x defaults ``bf16=True`` (autocast, also on CPU) and ``gradient_checkpointing=True``; both are
switched off here. The model is loaded in float32. With LoRA: ``LoraConfig(r, lora_alpha, lora_dropout=0.0,
target_modules="all-linear", task_type="CAUSAL_LM")`` passed as ``peft_config`` ("all-linear" excludes lm_head).
LoRA A is randomly initialised under ``set_seed(seed)`` (default 42) and B=0, so the model at step 1 equals the
base model; the reference is the same model with the adapter disabled. Without LoRA, TRL loads a second copy of
``DIR`` as the frozen reference model.

Output JSON (printed to stdout and written to --out)
----------------------------------------------------
* TRL's logged step-1 metrics (``trainer.state.log_history``, step 1): "loss", "logps/chosen",
  "logps/rejected", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"; also
  "grad_norm" (pre-clipping total norm), "logits/chosen", "logits/rejected", "entropy", "num_tokens",
  "mean_token_accuracy" when present; "trl_version" (+ transformers/peft/torch versions).
* "row_prompt_ids", "row_chosen_ids", "row_rejected_ids": the token ids TRL stored in ``trainer.train_dataset``
  (columns ``prompt_ids`` / ``chosen_ids`` / ``rejected_ids``), in file order, BEFORE collator truncation.
* "row_logps_chosen", "row_logps_rejected": per-row summed completion log-probs under the INITIAL model (before the
  step), computed by this script with a plain (unpadded, one row at a time) forward pass and
  log_softmax/gather over exactly the positions TRL treats as completion (after max_length truncation).
* "row_logps_chosen_trl_batched", "row_logps_rejected_trl_batched": the same quantity computed by TRL's own code
  path (``DataCollatorForPreference`` on the whole file + ``DPOTrainer.compute_ref_log_probs``, fused LM head);
  their mean reproduces the logged logps/* to ~1e-6. The plain per-row numbers above use a float64 log_softmax and
  agree with these to ~1e-5 (a float32 ``torch.log_softmax`` over the 49k vocab is biased by ~6e-6 per token,
  i.e. ~5e-5 on a 9-token completion -- use fp64 or a tolerance of ~1e-4 when comparing).
* "row_logps_chosen_after_step", "row_logps_rejected_after_step": the same after the single optimizer step
  (useful to compare the update; with LoRA they depend on TRL's random LoRA-A init, so only meaningful for
  --no-lora or an identical init). With --lr 0 the step changes nothing and they are the initial numbers.
* "check": |mean(row_logps_*) - logged logps/*| as a self-consistency check, plus "wall_time_s".

What TRL 1.16 actually does (read from trl/trainer/dpo_trainer.py and trl/data_utils.py)
---------------------------------------------------------------------------------------
Tokenisation (``DPOTrainer._prepare_dataset`` -> ``tokenize_fn``, done once at trainer construction):

* Conversational rows: three separate ``tokenizer.apply_chat_template(..., tokenize=True)`` calls:
  ``prompt`` with ``add_generation_prompt=True``; ``prompt + chosen`` and ``prompt + rejected`` (the full
  conversations) WITHOUT a generation prompt. ``prompt_len`` = min over chosen/rejected of the longest common
  token prefix between the prompt ids and the full-conversation ids (normally = len(prompt ids); if the template
  renders the prompt differently it silently truncates to the common prefix and warns once).
  ``prompt_ids = prompt[:prompt_len]``, ``chosen_ids = full_chosen[prompt_len:]`` (same for rejected).
  So the completion is *whatever the chat template renders after the generation prompt*: for ChatML-style
  templates (SmolLM2, Qwen) that is ``content + "<|im_end|>" + "\n"``, i.e. the end-of-turn token AND the
  trailing newline token are both completion tokens that are scored. No extra EOS is appended for
  conversational data. Any default system prompt injected by the template (SmolLM2 adds "You are a helpful AI
  assistant named SmolLM, ...") is part of the prompt ids. Chat-template BOS handling is whatever the template
  does (no tokenizer ``add_special_tokens`` on top).
  Concretely, SmolLM2-135M-Instruct, prompt [user "What is 2 + 3?"], chosen [assistant "2 + 3 = 5"]:
  prompt_ids (38) = [1, 9690, 198, 2683, ..., 8182, 2, 198,  1, 4093, 198, 1780, 314, 216, 34, 1232, 216, 35, 47,
  2, 198,  1, 520, 9531, 198] = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by
  Hugging Face<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n";
  chosen_ids (9) = [34, 1232, 216, 35, 446, 216, 37, 2, 198] = "2 + 3 = 5<|im_end|>\n" (2 = <|im_end|> = eos =
  pad, 198 = "\n", 1 = <|im_start|> doubles as bos; no extra BOS is prepended).
* Plain-string rows: EOS is appended to the chosen/rejected *strings* (if not already ending with it), then
  ``tokenizer(prompt)``, ``tokenizer(prompt + chosen)``, ``tokenizer(prompt + rejected)`` are tokenised as
  whole strings (with default ``add_special_tokens=True``, i.e. BOS if the tokenizer adds one), and the same
  common-prefix split is applied; a BPE merge across the prompt/completion boundary moves the merged token
  into the completion. E.g. SmolLM2 (adds no BOS): prompt "Q: What is 2 + 3?\nA:", chosen " 5" ->
  prompt_ids [65, 42, 1812, 314, 216, 34, 1232, 216, 35, 47, 198, 49, 42], chosen_ids [216, 37, 2].
* Rows with ``len(prompt_ids) >= max_length`` are dropped (truncation_mode="keep_start").

Collation (``DataCollatorForPreference``): the batch is ``[prompt+chosen for each row] + [prompt+rejected for
each row]`` (2N sequences, chosen half first), each truncated to its first ``max_length`` tokens
(keep_start, per sequence), then RIGHT-padded with ``pad_token_id`` (pad = eos if the tokenizer has no pad token).
``completion_mask`` is 1 exactly on the chosen/rejected tokens (after truncation), 0 on prompt and padding.

Log-probs / loss (``DPOTrainer._compute_loss``): ``labels = input_ids`` with non-completion positions set to -100;
a fused LM head (``trl.trainer.utils.add_fused_lm_head``) computes, for positions t=0..L-2, the log-prob of token
t+1 given tokens <= t (standard causal shift, temperature 1), only where label t+1 != -100, zero elsewhere.
``logps`` = SUM over the completion tokens (no length normalisation for loss_type="sigmoid");
the reference logps come from the same batch under the ref model / adapter-disabled model (no_grad).
``chosen_logratios = logps_c - ref_logps_c``, ``rejected_logratios = logps_r - ref_logps_r``,
``loss = mean_i(-logsigmoid(beta * (chosen_logratios - rejected_logratios)))`` (label_smoothing 0).
Metrics: ``rewards/chosen`` = mean(beta * chosen_logratios), ``rewards/rejected`` likewise,
``rewards/margins`` = mean(chosen_rewards - rejected_rewards), ``rewards/accuracies`` =
mean((chosen_rewards > rejected_rewards).float()) -- STRICT ">", so ties count as 0 --,
``logps/chosen`` / ``logps/rejected`` = batch mean of the POLICY's summed completion log-probs.
All metrics are computed in the forward pass *before* the optimizer step. At step 1 the policy equals the
reference (LoRA B=0, or a fresh copy without LoRA), so rewards are exactly 0, margins 0, accuracies 0.0 and
loss = log(2) = 0.693147...; only logps/* (and grad_norm) carry information at step 1.
"""

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

import datasets  # noqa: E402
import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402


METRIC_KEYS = [
    "loss",
    "logps/chosen",
    "logps/rejected",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
]
EXTRA_METRIC_KEYS = [
    "grad_norm",
    "logits/chosen",
    "logits/rejected",
    "entropy",
    "mean_token_accuracy",
    "num_tokens",
]


def log(msg):
    print(f"[trl_dpo_reference] {msg}", file=sys.stderr, flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="local HF model dir")
    p.add_argument("--data", required=True, help="preference jsonl (prompt/chosen/rejected)")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="must equal the number of rows in --data (the whole file is one batch); default: row count",
    )
    p.add_argument("--max-length", type=int, default=256, help="per-sequence max length (<=0: no truncation)")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--no-lora", action="store_true", help="full fine-tuning instead of LoRA")
    p.add_argument("--seed", type=int, default=42, help="TRL/Trainer seed (affects LoRA A init only)")
    p.add_argument(
        "--attn-implementation",
        default=None,
        help="e.g. eager or sdpa; default: transformers' default for the model (sdpa)",
    )
    p.add_argument("--out", default=None, help="also write the JSON here")
    return p.parse_args(argv)


def load_rows(path):
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                rows.append(json.loads(line))
    if not rows:
        raise SystemExit(f"no rows in {path}")
    return rows


@torch.no_grad()
def row_completion_logps(model, prompt_ids, completion_ids, max_length):
    """Summed log-prob of the completion tokens, one unpadded sequence, mirroring TRL's masks/truncation."""
    ids = list(prompt_ids) + list(completion_ids)
    mask = [0] * len(prompt_ids) + [1] * len(completion_ids)
    if max_length is not None:
        ids, mask = ids[:max_length], mask[:max_length]
    input_ids = torch.tensor([ids], dtype=torch.long, device=model.device)
    attention_mask = torch.ones_like(input_ids)
    # No `fused_lm_head` kwarg -> TRL's patched forward falls through to the original forward (returns logits)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.double()
    logprobs = torch.log_softmax(logits[0, :-1], dim=-1)  # float64 log_softmax: fp32 over 49k vocab drifts ~1e-5
    targets = input_ids[0, 1:]
    token_logps = logprobs.gather(-1, targets[:, None])[:, 0]
    m = torch.tensor(mask[1:], dtype=token_logps.dtype, device=token_logps.device)
    return float((token_logps * m).sum().item())


def all_row_logps(model, ds, max_length):
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    for ex in ds:
        chosen.append(row_completion_logps(model, ex["prompt_ids"], ex["chosen_ids"], max_length))
        rejected.append(row_completion_logps(model, ex["prompt_ids"], ex["rejected_ids"], max_length))
    if was_training:
        model.train()
    return chosen, rejected


def main(argv=None):
    args = parse_args(argv)
    # Trainer callbacks (PrinterCallback) print to stdout; keep stdout for the single JSON object.
    with contextlib.redirect_stdout(sys.stderr):
        result = run(args)
    text = json.dumps(result)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text, flush=True)
    return result


@torch.no_grad()
def trl_batched_row_logps(trainer, ds):
    """Per-row logps exactly as TRL computes the reference logps: its collator (whole file as one right-padded
    batch, per-sequence max_length truncation) + fused LM head, via ``DPOTrainer.compute_ref_log_probs``. Before the
    step the reference equals the policy (LoRA: adapter disabled, B=0 anyway; full FT: fresh copy of DIR)."""
    batch = trainer.data_collator([ds[i] for i in range(len(ds))])
    batch = {k: v.to(trainer.accelerator.device) for k, v in batch.items()}
    model = trainer.ref_model if trainer.ref_model is not None else trainer.model
    chosen, rejected = trainer.compute_ref_log_probs(model, batch)
    return [float(x) for x in chosen.float().cpu()], [float(x) for x in rejected.float().cpu()]


def run(args):
    t0 = time.time()
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    rows = load_rows(args.data)
    n = len(rows)
    if args.batch_size is None:
        args.batch_size = n
    if args.batch_size != n:
        raise SystemExit(
            f"--batch-size ({args.batch_size}) must equal the number of rows in {args.data} ({n}): "
            "this script runs the whole file as exactly one batch/step."
        )
    max_length = args.max_length if args.max_length and args.max_length > 0 else None

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model_kwargs = {"dtype": torch.float32}
    if args.attn_implementation:
        model_kwargs["attn_implementation"] = args.attn_implementation
    model = AutoModelForCausalLM.from_pretrained(args.model, **model_kwargs)

    peft_config = None
    if not args.no_lora:
        peft_config = LoraConfig(
            r=args.lora_r,
            lora_alpha=args.lora_alpha,
            lora_dropout=0.0,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )

    out_dir = tempfile.mkdtemp(prefix="trl_dpo_ref_")
    config = DPOConfig(
        output_dir=out_dir,
        bf16=False,
        fp16=False,
        use_cpu=True,
        gradient_checkpointing=False,  # TRL default True; deprecated alias in transformers 5.x
        activation_checkpointing=False,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        max_steps=1,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        learning_rate=args.lr,
        beta=args.beta,
        loss_type="sigmoid",
        max_length=max_length,
        disable_dropout=True,
        seed=args.seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )

    train_dataset = datasets.Dataset.from_list(rows)
    trainer = DPOTrainer(
        model=model,
        args=config,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )

    ds = trainer.train_dataset
    if len(ds) != n:
        raise SystemExit(
            f"TRL dropped {n - len(ds)} row(s) (prompt longer than max_length={max_length}); "
            "the single batch would not be the whole file."
        )
    row_prompt_ids = [list(map(int, ex["prompt_ids"])) for ex in ds]
    row_chosen_ids = [list(map(int, ex["chosen_ids"])) for ex in ds]
    row_rejected_ids = [list(map(int, ex["rejected_ids"])) for ex in ds]

    # Per-row log-probs under the INITIAL policy (LoRA B=0 => equals the base model).
    row_c, row_r = all_row_logps(trainer.model, ds, max_length)
    trl_c, trl_r = trl_batched_row_logps(trainer, ds)

    trainer.train()

    step1 = [h for h in trainer.state.log_history if h.get("step") == 1 and "loss" in h and "train_loss" not in h]
    if not step1:
        raise SystemExit(f"no step-1 log entry in log_history: {trainer.state.log_history}")
    logged = step1[0]

    if args.lr == 0:  # AdamW at lr 0 (no weight decay) leaves the weights as they were: skip the forwards
        row_c_after, row_r_after = row_c, row_r
    else:
        row_c_after, row_r_after = all_row_logps(trainer.model, ds, max_length)

    result = {k: logged.get(k) for k in METRIC_KEYS}
    for k in EXTRA_METRIC_KEYS:
        if k in logged:
            result[k] = logged[k]
    result.update(
        {
            "trl_version": trl.__version__,
            "transformers_version": transformers.__version__,
            "peft_version": peft.__version__,
            "torch_version": torch.__version__,
            "model": os.path.abspath(args.model),
            "data": os.path.abspath(args.data),
            "n_rows": n,
            "lora": not args.no_lora,
            "config": {
                "beta": args.beta,
                "learning_rate": args.lr,
                "batch_size": args.batch_size,
                "max_length": max_length,
                "lora_r": None if args.no_lora else args.lora_r,
                "lora_alpha": None if args.no_lora else args.lora_alpha,
                "seed": args.seed,
                "optim": str(config.optim),
                "lr_scheduler_type": str(config.lr_scheduler_type),
                "warmup_steps": config.warmup_steps,
                "weight_decay": config.weight_decay,
                "adam_beta1": config.adam_beta1,
                "adam_beta2": config.adam_beta2,
                "adam_epsilon": config.adam_epsilon,
                "max_grad_norm": config.max_grad_norm,
                "bf16": config.bf16,
                "activation_checkpointing": config.activation_checkpointing,
                "attn_implementation": trainer.model.config._attn_implementation,
                "pad_token_id": tokenizer.pad_token_id,
                "eos_token_id": tokenizer.eos_token_id,
            },
            "row_logps_chosen": row_c,
            "row_logps_rejected": row_r,
            "row_prompt_ids": row_prompt_ids,
            "row_chosen_ids": row_chosen_ids,
            "row_rejected_ids": row_rejected_ids,
            "row_logps_chosen_trl_batched": trl_c,
            "row_logps_rejected_trl_batched": trl_r,
            "row_logps_chosen_after_step": row_c_after,
            "row_logps_rejected_after_step": row_r_after,
            "check": {
                "abs_diff_mean_row_logps_chosen_vs_logged": abs(sum(row_c) / n - logged["logps/chosen"]),
                "abs_diff_mean_row_logps_rejected_vs_logged": abs(sum(row_r) / n - logged["logps/rejected"]),
                "abs_diff_mean_trl_batched_chosen_vs_logged": abs(sum(trl_c) / n - logged["logps/chosen"]),
                "abs_diff_mean_trl_batched_rejected_vs_logged": abs(sum(trl_r) / n - logged["logps/rejected"]),
                "max_abs_diff_row_vs_trl_batched": max(
                    abs(a - b) for a, b in zip(row_c + row_r, trl_c + trl_r, strict=True)
                ),
            },
            "wall_time_s": round(time.time() - t0, 2),
        }
    )

    return result


if __name__ == "__main__":
    main()
