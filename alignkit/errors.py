"""User-facing errors: the CLI prints them as one line and exits with code 2 (130 for an interrupt)."""
from __future__ import annotations

import errno


class UsageError(Exception):
    """Bad config, bad input file, impossible combination: the user can fix it."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during training, after a checkpoint was saved: the run can be resumed.

    A KeyboardInterrupt, so `except Exception` cleanup code lets it through.
    """

    def __init__(self, run_dir, step: int, checkpoint=None):
        super().__init__(f"interrupted at step {step}")
        self.run_dir, self.step, self.checkpoint = run_dir, step, checkpoint


# what the user can do about an OSError while writing outputs, by errno
_IO_ADVICE = {
    errno.ENOSPC: "free some disk space and run again; run.resume=true continues from the last checkpoint",
    errno.EDQUOT: "free some of your disk quota and run again; run.resume=true continues from the last checkpoint",
    errno.EACCES: "make it writable or pick another run.dir",
    errno.EPERM: "make it writable or pick another run.dir",
    errno.EROFS: "the file system is read-only: pick another run.dir",
    errno.ENOTDIR: "a parent of it is a file, not a directory: pick another run.dir",
}


def io_error(exc: OSError, what) -> UsageError | None:
    """A UsageError naming what could not be written and what to do; None for an OSError we can't advise on."""
    advice = _IO_ADVICE.get(exc.errno)
    if advice is None:
        return None
    return UsageError(f"cannot write {what}: {exc.strerror or exc} ({advice})")


def require(ok: bool, key: str, value, rule: str) -> None:
    """A range check on a config value: one line naming the key, its value and the rule."""
    if not ok:
        raise UsageError(f"{key}={value} is out of range: {rule}")
