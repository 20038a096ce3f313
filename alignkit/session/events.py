"""TensorBoard event files from a run's metrics.jsonl (run.tensorboard=true): RUN/tensorboard/."""
from __future__ import annotations

import shutil
from pathlib import Path

from ..errors import UsageError
from .logs import read_log


def require_tensorboard() -> None:
    try:
        import tensorboard  # noqa: F401
    except ImportError as exc:
        raise UsageError("run.tensorboard=true needs the tensorboard package (pip install tensorboard)") from exc


def write_events(run_dir: Path) -> Path:
    """Every numeric metric of every metrics.jsonl line as a scalar at its step; rewritten from scratch."""
    from torch.utils.tensorboard import SummaryWriter

    out = Path(run_dir) / "tensorboard"
    shutil.rmtree(out, ignore_errors=True)
    writer = SummaryWriter(log_dir=str(out))
    for record in read_log(Path(run_dir) / "metrics.jsonl"):
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                writer.add_scalar(key, value, record["step"])
    writer.close()
    return out
