"""alignkit: config-driven alignment of language models (SFT, DPO; LoRA, QLoRA, full)."""
import logging
import time

IMPORTED_AT = time.time()  # where a run's time to its first step starts (session/startup.py)

# bitsandbytes logs a warning on every import on CPUs with AVX512-bf16 when the optional
# `kernels` package is absent; it falls back to its own kernel, so the warning is noise.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

__version__ = "0.1.0"
