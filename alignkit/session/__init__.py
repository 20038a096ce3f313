"""One training session and what it runs on (the loops, checkpoints, faults, logs, several processes)."""
from __future__ import annotations

import os


def under_launcher() -> bool:
    """This process was started by torchrun (or accelerate launch), even as its only process."""
    return "LOCAL_RANK" in os.environ
