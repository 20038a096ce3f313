#!/usr/bin/env python
"""Step-1 DPO (KTO, ORPO) numbers of alignkit and of TRL's trainer on the same rows and model, side by side.

    python scripts/compare_trl.py --model DIR --data prefs.jsonl [--no-lora] [--json out.json]
    python scripts/compare_trl.py --formats [--model DIR] [--json out.json]
    python scripts/compare_trl.py --method kto|orpo [--model DIR] [--data FILE] [--no-lora] [--json out.json]

Both run in fp32 (TRL with bf16=False), the whole file as one batch, no warm-up. Compares
token ids per row, step-1 logps/chosen, logps/rejected, loss and, for a full fine-tune
(--no-lora, where no random LoRA init is involved), the pre-clipping grad_norm and the
log-probs after the first AdamW update (alignkit's step-2 logps vs TRL's after-step logps).
Exits 1 if any relative difference exceeds --rtol (default 1e-3). Needs the `bench` extra (trl).

--formats runs each preference format of scripts/trl_formats.py (implicit prompts as strings and as
messages, prompts that are not a token prefix, tools + chat_template_kwargs + a system turn and earlier
exchanges) through both, full fine-tune at lr=0, on the embedded SmolLM2-135M-Instruct unless --model is
given, and compares per row the token ids and completion masks, and logps/chosen, logps/rejected
(--rtol default 1e-5 there). "warned" says whether alignkit printed its prompt/completion divergence warning.

--method kto|orpo runs alignkit's and TRL's KTOTrainer / ORPOTrainer (scripts/trl_kto_orpo_reference.py) on
the rows of scripts/trl_kto_orpo_rows.py (or --data), on the embedded SmolLM2-135M-Instruct unless --model is
given, and compares the token ids (and KTO's mismatched pairs) and every number TRL logs by its name: loss,
rewards, log-probs, KTO's kl, ORPO's nll_loss and log odds, at step 1 and, for a full fine-tune (--no-lora),
also grad_norm and the numbers of step 2, after one update (KTO's step-1 loss is 1/2 whatever the maths:
policy = reference). alignkit runs KTO in file order (train.shuffle=false, as TRL samples) and ORPO with
method.nll_on_prompt=true (TRL's NLL). --rtol default 1e-5.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
KEYS = ["loss", "logps/chosen", "logps/rejected", "rewards/margins"]


# what each method's run needs to line up with TRL: KTO pairs each row with the one before it in file order
# (TRL samples in order); TRL's ORPOTrainer puts the prompt in the NLL
SAME_AS_TRL = {"dpo": [], "kto": ["train.shuffle=false"], "orpo": ["method.nll_on_prompt=true"]}


def alignkit_side(args, model: str, data: str, rows: int, run_dir: Path, steps: int = 2) -> tuple[list[dict], str]:
    """(the first `steps` metrics lines, stderr) of an alignkit run of args.method on the whole file as one batch."""
    overrides = [
        f"method={args.method}", f"adapter={'full' if args.no_lora else 'lora'}", f"model.path={model}",
        "model.dtype=float32", "train.precision=fp32", f"data.path={data}", "data.eval_fraction=0",
        f"data.max_length={args.max_length}", f"train.batch_size={rows}", f"train.max_steps={steps}",
        "train.warmup_ratio=0", "train.schedule=linear", f"train.lr={args.lr}", f"method.beta={args.beta}",
        f"run.dir={run_dir}", *SAME_AS_TRL[args.method],
    ]
    if not args.no_lora:
        overrides += [f"adapter.r={args.lora_r}", f"adapter.alpha={args.lora_alpha}"]
    done = subprocess.run([sys.executable, "-m", "alignkit", "train", *overrides], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"alignkit failed:\n{done.stderr[-2000:]}")
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()[:steps]], done.stderr


def trl_side(args, model: str, data: str, out: Path, steps: int = 1) -> dict:
    script = ["trl_dpo_reference.py"] if args.method == "dpo" else \
        ["trl_kto_orpo_reference.py", "--method", args.method, "--steps", str(steps)]
    cmd = [sys.executable, str(HERE / script[0]), *script[1:], "--model", model, "--data", data,
           "--beta", str(args.beta), "--lr", str(args.lr), "--max-length", str(args.max_length),
           "--lora-r", str(args.lora_r), "--lora-alpha", str(args.lora_alpha), "--out", str(out)]
    if args.no_lora:
        cmd.append("--no-lora")
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"TRL reference failed:\n{done.stderr[-2000:]}")
    return json.loads(out.read_text())


def rows_matching_trl(model: str, data: str, max_length: int, trl: dict) -> list[bool]:
    """Per row: alignkit's token ids and completion masks (chosen and rejected) == TRL's, after truncation."""
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer

    from alignkit.data.load import read_jsonl
    from alignkit.data.tokenize import encode_preference

    tok = AutoTokenizer.from_pretrained(model)
    cfg = OmegaConf.create({"max_length": max_length, "max_prompt_length": None})
    same = []
    for i, (where, row) in enumerate(read_jsonl(Path(data))):
        with contextlib.redirect_stderr(io.StringIO()):  # the alignkit run already showed its warning
            ours = encode_preference(tok, where, row, cfg)
        prompt = trl["row_prompt_ids"][i]
        theirs = {side: {"input_ids": (prompt + trl[f"row_{side}_ids"][i])[:max_length],
                         "completion_mask": ([0] * len(prompt) + [1] * len(trl[f"row_{side}_ids"][i]))[:max_length]}
                  for side in ("chosen", "rejected")}
        same.append(ours == theirs)
    return same


def rel_diff(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-8) if abs(a - b) > 1e-7 else 0.0


def run_formats(args) -> int:
    """Each format of trl_formats.py through alignkit and TRL (full fine-tune, lr=0): ids, masks, logps."""
    from trl_formats import FORMATS, write_case

    if args.model is None:
        from alignkit.models.load import resolve_model_dir

        args.model = resolve_model_dir("alignkit:smollm2-135m-instruct")
    args.no_lora, args.lr = True, 0.0
    report, worst, ok = {"trl_version": None, "formats": {}}, 0.0, True
    print(f"{'format':<26}{'rows':>5}{'ids+masks':>10}{'warned':>7}  {'logps/chosen':>12}{'trl':>12}{'rel':>9}"
          f"  {'logps/rejected':>14}{'trl':>12}{'rel':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in FORMATS:
            model, data, rows = write_case(name, args.model, Path(tmp))
            (ours,), stderr = alignkit_side(args, model, data, rows, Path(tmp) / f"{name}-run", steps=1)
            trl = trl_side(args, model, data, Path(tmp) / f"{name}-trl.json")
            same = rows_matching_trl(model, data, args.max_length, trl)
            entry = {"rows": rows, "rows_matching": same, "token_ids_match": all(same),
                     "warned": "is not a prefix of the tokenized prompt" in stderr,
                     "prompt_tokens": sum(len(p) for p in trl["row_prompt_ids"])}
            for k in ("logps/chosen", "logps/rejected"):
                entry[k] = {"alignkit": ours[k], "trl": trl[k], "rel_diff": rel_diff(ours[k], trl[k])}
                worst = max(worst, entry[k]["rel_diff"])
            ok = ok and entry["token_ids_match"]
            report["formats"][name], report["trl_version"] = entry, trl["trl_version"]
            c, r = entry["logps/chosen"], entry["logps/rejected"]
            print(f"{name:<26}{rows:>5}{str(entry['token_ids_match']):>10}{str(entry['warned']):>7}  "
                  f"{c['alignkit']:>12.5f}{c['trl']:>12.5f}{c['rel_diff']:>9.1e}  "
                  f"{r['alignkit']:>14.5f}{r['trl']:>12.5f}{r['rel_diff']:>9.1e}")
    report["max_rel_diff"] = worst
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0 if ok and worst <= args.rtol else 1


def compare(report: dict, ours: dict, trl: dict, keys: list[str]) -> float:
    """Print and record each key's alignkit and TRL values and their relative difference; the largest."""
    worst = 0.0
    print(f"{'metric':<26}{'alignkit':>14}{'trl':>14}{'rel diff':>12}")
    for k in keys:
        a, b = float(ours[k]), float(trl[k])
        rel = rel_diff(a, b)
        worst = max(worst, rel)
        report[k] = {"alignkit": a, "trl": b, "rel_diff": rel}
        print(f"{k:<26}{a:>14.6f}{b:>14.6f}{rel:>12.2e}")
    print(f"token ids identical: {report['token_ids_match']}")
    return worst


def run_unpaired(args) -> int:
    """KTO or ORPO: TRL's logged numbers at each step (the file is one batch): with LoRA step 1, with a full
    fine-tune also grad_norm and step 2, after one update; and the token ids (and KTO's mismatched pairs)."""
    from trl_kto_orpo_rows import METRICS, alignkit_rows, write_rows

    steps = 2 if args.no_lora else 1
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            from alignkit.models.load import resolve_model_dir

            args.model = resolve_model_dir("alignkit:smollm2-135m-instruct")
        data = args.data or write_rows(args.method, Path(tmp) / f"{args.method}.jsonl")
        rows = sum(1 for line in Path(data).read_text().splitlines() if line.strip())
        lines, _ = alignkit_side(args, args.model, data, rows, Path(tmp) / "run", steps)
        trl = trl_side(args, args.model, data, Path(tmp) / "trl.json", steps)
        same = [a == b for a, b in zip(alignkit_rows(args.method, args.model, data, args.max_length), trl["rows"])]
    keys = [f"step{i + 1}/{k}" for i in range(steps) for k in METRICS[args.method] + ["grad_norm"] * args.no_lora]
    ours = {f"step{i + 1}/{k}": v for i, line in enumerate(lines) for k, v in line.items()}
    theirs = {f"step{i + 1}/{k}": v for i, line in enumerate(trl["steps"]) for k, v in line.items()}
    report = {"method": args.method, "rows": rows, "token_ids_match": all(same) and len(same) == len(trl["rows"]),
              "rows_matching": same, "trl_version": trl["trl_version"]}
    worst = compare(report, ours, theirs, keys)
    report["max_rel_diff"] = worst
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0 if report["token_ids_match"] and worst <= args.rtol else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", choices=list(SAME_AS_TRL), default="dpo")
    ap.add_argument("--model", default=None, help="model dir (required for dpo without --formats)")
    ap.add_argument("--data", default=None, help=".jsonl rows (required for dpo without --formats)")
    ap.add_argument("--formats", action="store_true", help="every preference format of trl_formats.py")
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lora-alpha", type=int, default=32)
    ap.add_argument("--no-lora", action="store_true")
    ap.add_argument("--rtol", type=float, default=None, help="1e-3; 1e-5 with --formats, kto and orpo")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.formats or args.method != "dpo":
        args.rtol = 1e-5 if args.rtol is None else args.rtol
        return run_formats(args) if args.formats else run_unpaired(args)
    if args.model is None or args.data is None:
        ap.error("--model and --data are required (or --formats)")
    args.rtol = 1e-3 if args.rtol is None else args.rtol
    rows = sum(1 for line in Path(args.data).read_text().splitlines() if line.strip())
    with tempfile.TemporaryDirectory() as tmp:
        (ours, second), _ = alignkit_side(args, args.model, args.data, rows, Path(tmp) / "run")
        ours.update({f"after_step/{k}": second[k] for k in ("logps/chosen", "logps/rejected")})
        trl = trl_side(args, args.model, args.data, Path(tmp) / "trl.json")
    for side in ("chosen", "rejected"):
        after = trl[f"row_logps_{side}_after_step"]
        trl[f"after_step/logps/{side}"] = sum(after) / len(after)
    keys = KEYS + (["grad_norm", "after_step/logps/chosen", "after_step/logps/rejected"] if args.no_lora else [])
    report = {"token_ids_match": all(rows_matching_trl(args.model, args.data, args.max_length, trl)), "rows": rows,
              "trl_version": trl["trl_version"]}
    worst = compare(report, ours, trl, keys)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0 if report["token_ids_match"] and worst <= args.rtol else 1


if __name__ == "__main__":
    sys.exit(main())
