"""Rich rendering: progress bars and log lines on stderr, result tables on stdout."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.table import Table


class RichReporter:
    """Progress bars (total, rate, ETA) and log lines on stderr; silent when quiet."""

    def __init__(self, console: Console, quiet: bool = False) -> None:
        self.console = console
        self.quiet = quiet
        self._progress: Progress | None = None

    def log(self, message: str) -> None:
        if not self.quiet:
            self.console.print(message, soft_wrap=True)

    @contextmanager
    def track(self, description: str, total: int) -> Iterator[Callable[[int], None]]:
        if self.quiet:
            yield lambda n=1: None
            return
        progress = Progress(TextColumn("[bold blue]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TaskProgressColumn(), TextColumn("{task.fields[rate]}"),
                            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                            console=self.console, transient=False)
        with progress:
            task = progress.add_task(description, total=total, rate="")

            def advance(n: int = 1) -> None:
                progress.advance(task, n)
                speed = progress.tasks[task].speed
                progress.update(task, rate=f"{speed:.1f}/s" if speed else "")

            yield advance


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Table:
    result = Table(title=title, title_justify="left")
    for column in columns:
        result.add_column(column, overflow="fold")
    for row in rows:
        result.add_row(*(str(c) for c in row))
    return result


def size_text(n: float) -> str:
    """Bytes as people read them: 512 B, 1.5 KiB, 3.2 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
