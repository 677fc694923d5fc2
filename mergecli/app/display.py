"""Rich rendering: progress bars and log lines on stderr, result tables on stdout."""

from __future__ import annotations

import textwrap
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

from rich import box
from rich.console import Console, Group, RenderableType
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.table import Table

from ..quality.report import numeric_columns


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


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], width: int | None = None
          ) -> RenderableType:
    """A result table; numbers right-aligned and never broken. Wider than `width`, it is split into
    tables of consecutive columns that fit, each repeating the first column (the row's name), so
    no cell wraps into an unreadable sliver on an 80-column terminal."""
    cells = [[str(c) for c in row] for row in rows]
    right = numeric_columns(cells) or [False] * len(columns)
    full = _table(title, columns, cells, right, range(len(columns)))
    if width is None or _width(full) <= width:
        return full
    parts: list[list[int]] = [[]]
    for i in range(1, len(columns)):
        if parts[-1] and _width(_table("", columns, cells, right, [0, *parts[-1], i])) > width:
            parts.append([])
        parts[-1].append(i)
    return Group(*(_table(title if n == 0 else "", columns, cells, right, [0, *part]) for n, part in enumerate(parts)))


def _table(title: str, columns: Sequence[str], cells: list[list[str]], right: list[bool], keep: Sequence[int]
           ) -> Table:
    result = Table(title=title or None, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for i in keep:
        widest = max((len(row[i]) for row in cells), default=0)
        longest_word = max((len(word) for row in cells for word in row[i].split()), default=1)
        result.add_column(_header(columns[i], widest), justify="right" if right[i] else "left", no_wrap=right[i],
                          overflow="fold", min_width=min(longest_word, 40))  # text wraps at spaces, words stay whole
    for row in cells:
        result.add_row(*(row[i] for i in keep))
    return result


def _header(name: str, widest: int) -> str:
    """A header wraps at spaces, onto two lines at most, rather than widen a column beyond its
    widest cell ("gain kept" over "90.9%")."""
    width = max(widest, 1)
    while len(lines := textwrap.wrap(name, width, break_long_words=False)) > 2:
        width += 1
    return "\n".join(lines) or name


def _width(renderable: RenderableType) -> int:
    return Console(width=10_000).measure(renderable).maximum
