"""Atomic writes: a file or a directory appears whole or not at all (temp name, then rename)."""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from safetensors import SafetensorError

from .errors import io_error


def atomic_dir(target: Path, write) -> None:
    """write(tmp_dir), then rename tmp_dir to target (replacing an old one).

    A kill at any moment leaves the old target or the new one, never a half one; a failed write
    (disk full) removes its temp dir, keeps the old target and becomes a one-line UsageError.
    """
    target = Path(target)
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        write(tmp)
    except (OSError, SafetensorError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise io_error(as_os_error(exc), target) or exc
    if target.exists():
        old = target.parent / f".old-{target.name}-{os.getpid()}"
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


def as_os_error(exc: Exception) -> OSError:
    """safetensors reports a failed write as SafetensorError("... Os { code: 28, ... }"): the OSError in it."""
    if isinstance(exc, OSError):
        return exc
    found = re.search(r"(?:code: |os error )(\d+)", str(exc))
    code = int(found.group(1)) if found else 0
    return OSError(code, os.strerror(code) if code else str(exc))


def atomic_text(path: Path, text: str) -> None:
    tmp = Path(path).with_suffix(".tmp")
    try:
        tmp.write_text(text)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise io_error(exc, path) or exc
    os.replace(tmp, path)


def atomic_json(path: Path, data: dict) -> None:
    atomic_text(path, json.dumps(data, indent=2, default=str))
