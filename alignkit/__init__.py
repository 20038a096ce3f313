"""alignkit: config-driven alignment of language models (SFT, DPO; LoRA, QLoRA, full)."""
import logging
import os
import time

IMPORTED_AT = time.time()  # where a run's time to its first step starts (session/startup.py)

# CPU buffers of 2 MB and more page-aligned and advised for huge pages (PyTorch's own switch, Linux only):
# glibc's heap otherwise keeps the freed activations of one step in pieces the next step cannot reuse, and a
# CPU LoRA step peaks ~1 GB higher at the same speed (README, performance). PyTorch reads it at its first
# allocation, so it takes effect when alignkit is imported before torch (the CLI); THP_MEM_ALLOC_ENABLE=0 opts out.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

# bitsandbytes logs a warning on every import on CPUs with AVX512-bf16 when the optional
# `kernels` package is absent; it falls back to its own kernel, so the warning is noise.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

__version__ = "0.1.0"
