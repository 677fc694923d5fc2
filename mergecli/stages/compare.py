"""compare stage: everything missing, then one table of every model x dataset, best merge marked;
optionally written as json/csv/markdown and a PNG chart.

Output files are checked before any evaluation starts (a missing folder found after minutes of
work is a wasted run), and never written over an input.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from ..errors import MergeCliError, UsageError
from . import evaluate
from .base import Context, Option, Stage, View
from ..fsutil import temp_sibling
from ..quality.report import comparison, comparison_table, comparison_text, plot

FORMATS = ("table", "json", "csv", "markdown")


def check_output_file(ctx: Context, path: Path, what: str) -> None:
    """A report file may be new, or one this workspace's compare wrote and nobody changed since
    (rerunning compare replaces its own report); anything else at that name is left alone."""
    if not path.parent.is_dir():
        raise MergeCliError(f"{what} {path}: folder {path.parent} does not exist", "create it first")
    if path.is_dir():
        raise MergeCliError(f"{what} {path} is a folder", "give a file name")
    ctx.guard(path, what, folder=False)
    if (path.exists() or path.is_symlink()) and not ctx.workspace.owns_report(path):
        raise MergeCliError(f"{what} {path} already exists and is not a report mergecli wrote with this workspace "
                            "(or it changed since); it is left untouched", "choose another file name, or move it away")


def write_report(ctx: Context, path: Path, write: Callable[[Path], Any]) -> None:
    """Write a report file whole (a temporary sibling renamed over the name) and record it as
    this workspace's."""

    tmp = temp_sibling(path).with_suffix(path.suffix)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    ctx.workspace.wrote_report(path)


def run(ctx: Context, fmt: str = "table", output: Path | None = None, plot_path: Path | None = None
        ) -> tuple[str, list[dict[str, Any]]]:
    """Run what is missing, write the requested files; returns (format, comparison rows)."""

    if fmt not in FORMATS:
        raise UsageError(f"unknown --format {fmt!r}", f"use {', '.join(FORMATS)}")
    for path, what in ((output, "--output"), (plot_path, "--plot")):
        if path is not None:
            check_output_file(ctx, path, what)
    results = ctx.need(evaluate.STAGE)
    rows = comparison(results)
    if not ctx.dist.main:  # under torchrun rank 0 writes the files
        return fmt, rows
    if output:
        write_report(ctx, output, lambda p: p.write_text(comparison_text(rows, "json" if fmt == "table" else fmt)))
    if plot_path:
        write_report(ctx, plot_path, lambda p: plot(rows, p))
        ctx.reporter.log(f"chart written to {plot_path}")
    return fmt, rows


def show(result: tuple[str, list[dict[str, Any]]]) -> View | str:

    fmt, rows = result
    return comparison_view(rows) if fmt == "table" else comparison_text(rows, fmt)


def comparison_view(rows: list[dict[str, Any]]) -> View:

    columns, cells = comparison_table(rows)
    return View("perplexity on held-out text (lower is better; ★ best merge by mean)", columns, cells, rows)


STAGE = Stage(
    "compare", "Run what is missing, then one table of every model x dataset with the best merge marked.",
    run=run, show=show, order=50,
    options=(
        Option("fmt", str, "table", "table | json | csv | markdown", flags=("--format",)),
        Option("output", Path, None, "write the table in --format to this file"),
        Option("plot_path", Path, None, "grouped bar chart (PNG)", flags=("--plot",)),
    ))
