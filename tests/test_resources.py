"""glibc returns freed activation-sized blocks to the OS once alignkit sets its mmap threshold."""
from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import ctypes, os, sys
import psutil
from alignkit.session.resources import return_freed_memory
if sys.argv[1] == "1":
    assert return_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
rss = lambda: psutil.Process().memory_info().rss
# glibc raises its dynamic threshold when a mmapped block is freed: do it once, then allocate a batch of blocks
first = libc.malloc(8 << 20); ctypes.memset(first, 1, 8 << 20); libc.free(first)
before = rss()
blocks = [libc.malloc(4 << 20) for _ in range(64)]
for b in blocks:
    ctypes.memset(b, 1, 4 << 20)
for b in blocks[:-1]:  # keep the last: the freed ones below it cannot be trimmed off the heap top
    libc.free(b)
print((rss() - before) >> 20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_freed_blocks_leave_rss_only_with_the_threshold_set():
    kept = [int(subprocess.run([sys.executable, "-c", PROBE, flag], capture_output=True, text=True,
                               check=True).stdout) for flag in ("0", "1")]
    assert kept[0] >= 200  # glibc default: ~252 MB of freed blocks stay resident
    assert kept[1] <= 16   # threshold set: returned at once
