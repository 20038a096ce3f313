"""Peak memory of this process (RSS) and of the GPU; glibc told to return freed blocks (opt-in)."""
from __future__ import annotations

import ctypes
import resource
import sys

import torch


def peak_memory_mb(device: torch.device) -> dict:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_mb = rss / 1024 / (1024 if sys.platform == "darwin" else 1)  # bytes on macOS, KiB on Linux
    out = {"peak_rss_mb": round(rss_mb, 1)}
    if device.type == "cuda":
        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def return_freed_memory(threshold: int = 1 << 20) -> bool:
    """Make glibc give every freed block >= 1 MiB back to the OS at once (Linux); True when set.

    glibc raises its mmap threshold each time a large mmapped block is freed; after that, activations are
    carved out of the heap, and freed ones stay resident: peak RSS ends up well above what is ever alive.
    A fixed threshold keeps RSS at the live size (DPO + LoRA on SmolLM2: 3.1 GB -> 1.4 GB) but maps and
    faults in every activation afresh, which made training steps ~1.5-2x slower on the CPU, so alignkit
    sets it only when asked: ALIGNKIT_RETURN_MEMORY=1.
    """
    if sys.platform != "linux":
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):  # not glibc (musl) or no mallopt
        return False
