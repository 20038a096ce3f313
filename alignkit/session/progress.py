"""Console output: a rich progress bar with loss and ETA on a terminal (silent otherwise), tables."""
from __future__ import annotations

import contextlib
import sys


class _Silent:
    def update(self, step: int, loss) -> None:
        pass


@contextlib.contextmanager
def progress_bar(total: int, start: int, label: str = "train", shown: bool = True):
    """shown=False: silent (the processes other than rank 0 of a multi-process run)."""
    if not (shown and sys.stderr.isatty()):
        yield _Silent()
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = [TextColumn(label), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn()]
    with Progress(*columns, console=Console(stderr=True)) as progress:
        task = progress.add_task(label, total=total, completed=start, loss="-")

        class _Bar:
            def update(self, step: int, loss) -> None:
                progress.update(task, completed=step, loss="-" if loss is None else f"{loss:.4f}")

        yield _Bar()


def print_table(title: str, values: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in values.items():
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    Console().print(table)
