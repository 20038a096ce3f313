#!/usr/bin/env python
"""Step-1 DPO numbers of alignkit and of TRL's DPOTrainer on the same rows and model, side by side.

    python scripts/compare_trl.py --model DIR --data prefs.jsonl [--no-lora] [--json out.json]

Both run in fp32 (TRL with bf16=False), the whole file as one batch, no warm-up. Compares
token ids per row, step-1 logps/chosen, logps/rejected, loss and, for a full fine-tune
(--no-lora, where no random LoRA init is involved), the pre-clipping grad_norm and the
log-probs after the first AdamW update (alignkit's step-2 logps vs TRL's after-step logps).
Exits 1 if any relative difference exceeds --rtol (default 1e-3). Needs the `bench` extra (trl).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
KEYS = ["loss", "logps/chosen", "logps/rejected", "rewards/margins"]


def alignkit_side(args, rows: int, run_dir: Path) -> dict:
    overrides = [
        "method=dpo", f"adapter={'full' if args.no_lora else 'lora'}", f"model.path={args.model}",
        "model.dtype=float32", "train.precision=fp32", f"data.path={args.data}", "data.eval_fraction=0",
        f"data.max_length={args.max_length}", f"train.batch_size={rows}", "train.max_steps=2",
        "train.warmup_ratio=0", "train.schedule=linear", f"train.lr={args.lr}", f"method.beta={args.beta}",
        f"run.dir={run_dir}",
    ]
    if not args.no_lora:
        overrides += [f"adapter.r={args.lora_r}", f"adapter.alpha={args.lora_alpha}"]
    done = subprocess.run([sys.executable, "-m", "alignkit", "train", *overrides], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"alignkit failed:\n{done.stderr[-2000:]}")
    first, second = (json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()[:2])
    first.update({f"after_step/{k}": second[k] for k in ("logps/chosen", "logps/rejected")})
    return first


def trl_side(args, out: Path) -> dict:
    cmd = [sys.executable, str(HERE / "trl_dpo_reference.py"), "--model", args.model, "--data", args.data,
           "--beta", str(args.beta), "--lr", str(args.lr), "--max-length", str(args.max_length),
           "--lora-r", str(args.lora_r), "--lora-alpha", str(args.lora_alpha), "--out", str(out)]
    if args.no_lora:
        cmd.append("--no-lora")
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"TRL reference failed:\n{done.stderr[-2000:]}")
    return json.loads(out.read_text())


def token_ids_match(args, trl: dict) -> bool:
    """alignkit's tokenisation of each row == TRL's prompt/chosen/rejected ids."""
    from transformers import AutoTokenizer

    from alignkit.data.load import read_jsonl
    from alignkit.data.tokenize import encode_pair

    tok = AutoTokenizer.from_pretrained(args.model)
    for i, (_, row) in enumerate(read_jsonl(Path(args.data))):
        p, c = encode_pair(tok, row["prompt"], row["chosen"])
        _, r = encode_pair(tok, row["prompt"], row["rejected"])
        if (p, c, r) != (trl["row_prompt_ids"][i], trl["row_chosen_ids"][i], trl["row_rejected_ids"][i]):
            return False
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lora-alpha", type=int, default=32)
    ap.add_argument("--no-lora", action="store_true")
    ap.add_argument("--rtol", type=float, default=1e-3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = sum(1 for line in Path(args.data).read_text().splitlines() if line.strip())
    with tempfile.TemporaryDirectory() as tmp:
        ours = alignkit_side(args, rows, Path(tmp) / "run")
        trl = trl_side(args, Path(tmp) / "trl.json")
    for side in ("chosen", "rejected"):
        after = trl[f"row_logps_{side}_after_step"]
        trl[f"after_step/logps/{side}"] = sum(after) / len(after)
    keys = KEYS + (["grad_norm", "after_step/logps/chosen", "after_step/logps/rejected"] if args.no_lora else [])
    report = {"token_ids_match": token_ids_match(args, trl), "rows": rows, "trl_version": trl["trl_version"]}
    worst = 0.0
    print(f"{'metric':<26}{'alignkit':>14}{'trl':>14}{'rel diff':>12}")
    for k in keys:
        a, b = float(ours[k]), float(trl[k])
        rel = abs(a - b) / max(abs(b), 1e-8) if abs(a - b) > 1e-7 else 0.0
        worst = max(worst, rel)
        report[k] = {"alignkit": a, "trl": b, "rel_diff": rel}
        print(f"{k:<26}{a:>14.6f}{b:>14.6f}{rel:>12.2e}")
    print(f"token ids identical: {report['token_ids_match']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0 if report["token_ids_match"] and worst <= args.rtol else 1


if __name__ == "__main__":
    sys.exit(main())
