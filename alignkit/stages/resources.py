"""Peak memory of this process (RSS) and of the GPU; glibc told to return freed blocks."""
from __future__ import annotations

import ctypes
import os
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
    """Make glibc give large freed blocks back to the OS (Linux); True when set.

    glibc raises its mmap threshold each time a large mmapped block is freed, after which activations of
    the next step are carved out of the heap and stay resident when freed: the process's RSS grows to
    about twice what is alive at any moment. A fixed threshold keeps every block >= 1 MiB (activations,
    logits chunks) in its own mapping, returned on free. ALIGNKIT_MALLOC_KEEP=1 leaves glibc as it is.
    """
    if sys.platform != "linux" or os.environ.get("ALIGNKIT_MALLOC_KEEP") == "1":
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):  # not glibc (musl) or no mallopt
        return False
