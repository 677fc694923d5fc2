"""The `mergecli` command: thin Typer commands over the Python API.

Each command parses its arguments, calls one stage, and renders the result (a Rich table, or JSON
on stdout with --json). Errors the user can fix print as one line with a hint; tracebacks only
with --debug.
"""

from __future__ import annotations

import functools
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.console import Console
from rich.markup import escape

from . import __version__
from .display import RichReporter, table
from .errors import MergeCliError
from .recipe import Recipe, load_recipe, recipes_dir
from .stages.hessian import run_hessian
from .report import comparison, plot, render
from .stages.evaluate import run_eval, used_artifacts
from .stages.merge import run_merge
from .stages.taskvec import run_taskvec
from .workspace import Workspace

app = typer.Typer(help="Merge fine-tuned language models: task vectors, Hessians, merges, evaluation.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
recipes_app = typer.Typer(help="List and copy the built-in recipes.", no_args_is_help=True)
ws_app = typer.Typer(help="Inspect and clean the workspace cache.", no_args_is_help=True)
app.add_typer(recipes_app, name="recipes")
app.add_typer(ws_app, name="ws")

OVERRIDES = typer.Argument(None, help="recipe overrides, e.g. density=0.3 merges.ties.seed=1", show_default=False)
RECIPE = typer.Argument(..., help="YAML recipe file", show_default=False)


@dataclass
class Options:
    workspace: Optional[Path] = None
    quiet: bool = False
    json: bool = False
    device: str = "cpu"
    debug: bool = False
    wait: bool = True

    @property
    def out(self) -> Console:
        return Console()

    @property
    def err(self) -> Console:
        return Console(stderr=True)

    @property
    def reporter(self) -> RichReporter:
        return RichReporter(self.err, quiet=self.quiet or self.json)

    def recipe(self, path: Path, overrides: list[str] | None) -> Recipe:
        extra = [f"workspace={self.workspace.resolve()}"] if self.workspace else []
        return load_recipe(path, list(overrides or []) + extra)

    def emit(self, data: Any, title: str, columns: list[str], rows: list[list[Any]]) -> None:
        if self.json:
            typer.echo(json.dumps(data, indent=2, default=str))
        elif not self.quiet:
            self.out.print(table(title, columns, rows))


OPTIONS = Options()


@app.callback(invoke_without_command=True)
def main_options(
    ctx: typer.Context,
    workspace: Optional[Path] = typer.Option(None, "--workspace", "-w", help="workspace folder (overrides the recipe's)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars or logs"),
    json_output: bool = typer.Option(False, "--json", help="machine-readable result on stdout"),
    device: str = typer.Option("cpu", "--device", help="torch device for the math: cpu, cuda, cuda:1, mps"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="wait for, or fail on, another run holding a lock"),
    version: bool = typer.Option(False, "--version", help="print the version and exit", is_eager=True),
) -> None:
    if version:
        typer.echo(f"mergecli {__version__}")
        raise typer.Exit()
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())
        raise typer.Exit()
    OPTIONS.__init__(workspace, quiet, json_output, device, debug, wait)


def command(fn: Callable[..., None]) -> Callable[..., None]:
    """Turn MergeCliError into one line on stderr and its exit code; other errors too, unless --debug."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except MergeCliError as exc:
            if OPTIONS.debug:
                raise
            OPTIONS.err.print(f"[bold red]Error:[/] {escape(exc.message)}", highlight=False, soft_wrap=True)
            if exc.hint:
                OPTIONS.err.print(f"[dim]hint: {escape(exc.hint)}[/]", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except (typer.Exit, typer.Abort):
            raise
        except KeyboardInterrupt:
            OPTIONS.err.print("[red]interrupted[/]: finished artifacts are kept; rerun to resume")
            raise typer.Exit(130) from None
        except Exception as exc:  # noqa: BLE001
            if OPTIONS.debug:
                raise
            OPTIONS.err.print(f"[bold red]Internal error:[/] {type(exc).__name__}: {escape(str(exc))}",
                              highlight=False, soft_wrap=True)
            OPTIONS.err.print("[dim]hint: rerun with --debug for the traceback, and report it[/]")
            raise typer.Exit(1) from None
    return wrapper


# -- recipes --------------------------------------------------------------------------------
@app.command()
@command
def validate(recipe: Path = RECIPE, overrides: Optional[list[str]] = OVERRIDES) -> None:
    """Check a recipe (schema, values, paths) without opening any model."""
    resolved = OPTIONS.recipe(recipe, overrides)
    data = resolved.model_dump(by_alias=True, exclude_none=True)
    rows = [[m.name, m.method, m.score or "-", m.density, m.lambda_, m.topk] for m in resolved.merges]
    if OPTIONS.json:
        typer.echo(json.dumps({"valid": True, "recipe": data}, indent=2, default=str))
        return
    if not OPTIONS.quiet:
        OPTIONS.err.print(f"[green]recipe {recipe} is valid[/]: base {resolved.base}, "
                          f"{len(resolved.models)} fine-tune(s), {len(resolved.merges)} merge(s)")
        OPTIONS.out.print(table("merges", ["name", "method", "score", "density", "lambda", "top-k per"], rows))


def builtin_recipes() -> dict[str, Path]:
    """The built-in recipes by name."""
    return {p.stem: p for p in sorted(recipes_dir().glob("*.yaml"))}


@recipes_app.command("ls")
@command
def recipes_ls() -> None:
    """List the built-in recipes."""
    found = builtin_recipes()
    rows = [[name, _description(path)] for name, path in found.items()]
    OPTIONS.emit({name: {"path": str(p), "description": _description(p)} for name, p in found.items()},
                 "built-in recipes (copy one with `mergecli recipes cp NAME DEST`)", ["name", "description"], rows)


@recipes_app.command("cp")
@command
def recipes_cp(name: str = typer.Argument(..., help="built-in recipe name"),
               dest: Path = typer.Argument(..., help="file or folder to copy it to")) -> None:
    """Copy a built-in recipe to edit it."""
    found = builtin_recipes()
    if name not in found:
        raise MergeCliError(f"no built-in recipe named {name!r}", f"choose one of: {', '.join(found)}")
    target = dest / f"{name}.yaml" if dest.is_dir() else dest
    if target.exists():
        raise MergeCliError(f"{target} already exists", "choose another destination")
    shutil.copyfile(found[name], target)
    OPTIONS.reporter.log(f"copied {name} to {target}")


def _description(path: Path) -> str:
    first = path.read_text().splitlines()[0] if path.stat().st_size else ""
    return first.lstrip("# ").strip()


# -- stages ---------------------------------------------------------------------------------
@app.command()
@command
def taskvec(recipe: Path = RECIPE, overrides: Optional[list[str]] = OVERRIDES) -> None:
    """Compute each fine-tune's task vector (fine-tune minus base) into the workspace cache."""
    resolved = OPTIONS.recipe(recipe, overrides)
    vectors = run_taskvec(resolved, OPTIONS.reporter, OPTIONS.wait)
    data = [{"model": v.model, "kind": v.kind, "key": v.artifact.key, "path": str(v.path), "reused": v.reused,
             "bytes": v.artifact.size, "tensors": v.tensors} for v in vectors]
    rows = [[d["model"], d["kind"], d["tensors"], _size(d["bytes"]), "reused" if d["reused"] else "computed", d["key"]]
            for d in data]
    OPTIONS.emit(data, "task vectors", ["model", "kind", "tensors", "size", "status", "cache key"], rows)


@app.command()
@command
def merge(recipe: Path = RECIPE, overrides: Optional[list[str]] = OVERRIDES,
          only: Optional[list[str]] = typer.Option(None, "--only", help="merge only this variant (repeatable)"),
          overwrite: bool = typer.Option(False, "--overwrite", help="replace output folders not written by mergecli"),
          dtype: Optional[str] = typer.Option(None, "--dtype", help="output dtype of every variant: float32, float16, bfloat16"),
          workers: int = typer.Option(2, "--workers", min=1, help="tensors computed at once (threads); same result for any value")) -> None:
    """Build every merge variant of the recipe as a Hugging Face model folder."""
    resolved = OPTIONS.recipe(recipe, list(overrides or []) + ([f"dtype={dtype}"] if dtype else []))
    results = run_merge(resolved, only, overwrite, OPTIONS.device, OPTIONS.reporter, OPTIONS.wait, workers=workers)
    rows = [[r.name, r.method, r.score or "-", r.density, f"{r.kept_density:.4f}", f"{r.seconds:.1f}",
             "reused" if r.reused else "built", r.path] for r in results]
    OPTIONS.emit([r.as_dict() for r in results], "merges",
                 ["name", "method", "score", "density", "kept", "seconds", "status", "output"], rows)


@app.command()
@command
def hessian(recipe: Path = RECIPE, overrides: Optional[list[str]] = OVERRIDES,
            samples: Optional[int] = typer.Option(None, help="calibration windows per fine-tune [recipe: 128]"),
            seq_len: Optional[int] = typer.Option(None, "--seq-len", help="tokens per window [recipe: 512]"),
            batch_size: Optional[int] = typer.Option(None, "--batch-size", help="windows per forward pass [recipe: 4]"),
            layer_by_layer: Optional[bool] = typer.Option(None, "--layer-by-layer/--whole-model",
                                                          help="one decoder block on the device at a time"),
            source: Optional[str] = typer.Option(None, help="collect on each 'finetune' (default) or on the 'base'")) -> None:
    """Collect per-layer H = X^T X from each fine-tune's calibration data (for sparsegpt, wanda, regmean)."""
    flags = {"samples": samples, "seq_len": seq_len, "batch_size": batch_size, "layer_by_layer": layer_by_layer,
             "source": source}
    extra = [f"calibration.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in flags.items() if v is not None]
    resolved = OPTIONS.recipe(recipe, list(overrides or []) + extra)
    sets = run_hessian(resolved, OPTIONS.reporter, OPTIONS.wait, OPTIONS.device)
    data = [{"model": h.model, "key": h.artifact.key, "reused": h.reused, "bytes": h.artifact.size,
             "tokens": h.meta["tokens"], "groups": len(h.meta["groups"]), "layers": len(h.meta["members"]),
             "dataset": h.meta["dataset"], "path": str(h.artifact.path)} for h in sets]
    rows = [[d["model"], d["dataset"], d["tokens"], d["layers"], d["groups"], _size(d["bytes"]),
             "reused" if d["reused"] else "collected"] for d in data]
    OPTIONS.emit(data, "hessians", ["model", "dataset", "tokens", "linear layers", "groups", "size", "status"], rows)


@app.command(name="eval")
@command
def evaluate(recipe: Path = RECIPE, overrides: Optional[list[str]] = OVERRIDES) -> None:
    """Perplexity of the base, every fine-tune and every merge on every dataset of the recipe."""
    resolved = OPTIONS.recipe(recipe, overrides)
    results = run_eval(resolved, OPTIONS.reporter, OPTIONS.wait, OPTIONS.device)
    datasets = list(results[0].perplexity)
    rows = [[r.model, r.role, *(f"{r.perplexity[d]:.3f}" for d in datasets), f"{r.mean:.3f}"] for r in results]
    OPTIONS.emit([{"model": r.model, "role": r.role, "perplexity": r.perplexity, "mean": r.mean} for r in results],
                 "perplexity (lower is better)", ["model", "role", *datasets, "mean"], rows)


@app.command()
@command
def compare(recipe: Path = RECIPE, overrides: Optional[list[str]] = OVERRIDES,
            fmt: str = typer.Option("table", "--format", help="table | json | csv | markdown"),
            output: Optional[Path] = typer.Option(None, "--output", help="write the table in --format to this file"),
            plot_path: Optional[Path] = typer.Option(None, "--plot", help="grouped bar chart (PNG)")) -> None:
    """Run what is missing, then one table of every model x dataset with the best merge marked."""
    if fmt not in ("table", "json", "csv", "markdown"):
        raise MergeCliError(f"unknown --format {fmt!r}", "use table, json, csv or markdown")
    resolved = OPTIONS.recipe(recipe, overrides)
    results = run_eval(resolved, OPTIONS.reporter, OPTIONS.wait, OPTIONS.device)
    rows = comparison(results)
    if output:
        output.write_text(render(rows, "json" if fmt == "table" else fmt))
    if plot_path:
        plot(results, plot_path)
        OPTIONS.reporter.log(f"chart written to {plot_path}")
    if OPTIONS.json or fmt == "json":
        typer.echo(render(rows, "json"))
    elif fmt in ("csv", "markdown"):
        typer.echo(render(rows, fmt), nl=False)
    elif not OPTIONS.quiet:
        OPTIONS.out.print(comparison_table(rows))


def comparison_table(rows: list[dict]) -> Any:
    datasets = [k for k in rows[0] if k.startswith("ppl_") and k != "ppl_mean"]
    harness = [k for k in rows[0] if ":" in k]
    columns = ["model", "role", *(d[4:] for d in datasets), "mean", *harness, "vs own FT", "kept", "merge s"]
    body = []
    for row in rows:
        change = row["vs_own_finetune"]
        body.append([("★ " if row["best"] else "") + row["model"], row["method"] or row["role"],
                     *(f"{row[d]:.3f}" for d in datasets), f"{row['ppl_mean']:.3f}",
                     *(f"{row[k]:.4f}" for k in harness),
                     "" if change is None else f"{100 * change:+.1f}%",
                     "" if row["kept_density"] is None else f"{row['kept_density']:.3f}",
                     "" if row["merge_seconds"] is None else f"{row['merge_seconds']:.1f}"])
    return table("perplexity on held-out text (lower is better; ★ best merge by mean)", columns, body)


@app.command()
@command
def demo(workdir: Path = typer.Option(Path("mergecli-demo"), "--workdir", help="where the demo's models and results go"),
         overrides: Optional[list[str]] = OVERRIDES) -> None:
    """The whole pipeline on SmolLM2-135M-Instruct with three home-made fine-tunes; no model hub needed."""
    from .demo import run_demo

    recipe, results = run_demo(workdir, OPTIONS.reporter, OPTIONS.device, OPTIONS.wait, overrides)
    rows = comparison(results)
    (workdir / "compare.json").write_text(render(rows, "json"))
    (workdir / "compare.md").write_text(render(rows, "markdown"))
    plot(results, workdir / "compare.png")
    if OPTIONS.json:
        typer.echo(render(rows, "json"))
    elif not OPTIONS.quiet:
        OPTIONS.out.print(comparison_table(rows))
        OPTIONS.err.print(f"results in {workdir}/compare.(json|md|png); rerun any stage with "
                          f"`mergecli <stage> {workdir / 'recipe.yaml'}`")


@app.command()
@command
def archs(fmt: str = typer.Option("table", "--format", help="table | markdown | json")) -> None:
    """The architectures tested end to end, and what mergecli reads off each."""
    from .models.support import describe_supported

    rows = describe_supported()
    if fmt == "markdown" or fmt == "json":
        typer.echo(render(rows, fmt), nl=False)
    else:
        OPTIONS.emit(rows, "supported architectures", list(rows[0]), [list(r.values()) for r in rows])


# -- workspace ------------------------------------------------------------------------------
def _workspace(recipe: Optional[Path], overrides: Optional[list[str]]) -> Workspace:
    if OPTIONS.workspace:
        return Workspace(OPTIONS.workspace.resolve(), log=OPTIONS.reporter.log)
    if recipe is None:
        raise MergeCliError("which workspace?", "pass a recipe, or --workspace PATH before the command")
    return Workspace(load_recipe(recipe, overrides, check_paths=False).workspace_path, log=OPTIONS.reporter.log)


@ws_app.command("ls")
@command
def ws_ls(recipe: Optional[Path] = typer.Argument(None, help="recipe whose workspace to list")) -> None:
    """List cached artifacts with their sizes."""
    ws = _workspace(recipe, None)
    artifacts = sorted(ws.artifacts(), key=lambda a: (a.kind, a.label))
    data = [{"kind": a.kind, "key": a.key, "label": a.label, "bytes": a.size, "path": str(a.path)} for a in artifacts]
    rows = [[a.kind, a.label, _size(a.size), a.key] for a in artifacts]
    rows.append(["total", "", _size(sum(a.size for a in artifacts)), ""])
    OPTIONS.emit(data, f"workspace {ws.root}", ["kind", "what", "size", "key"], rows)


@ws_app.command("gc")
@command
def ws_gc(recipes: list[Path] = typer.Argument(..., help="recipes whose artifacts to keep"),
          dry_run: bool = typer.Option(False, "--dry-run", help="only list what would be removed")) -> None:
    """Remove cached artifacts that none of the given recipes uses (and leftovers of killed runs)."""
    loaded = [load_recipe(r) for r in recipes]
    ws = _workspace(recipes[0], None)
    keep: set[str] = set()
    for r in loaded:
        keep |= used_artifacts(r)
    if dry_run:
        garbage = ws.garbage(keep)
        OPTIONS.emit([str(p) for p in garbage], "would remove", ["path"], [[p] for p in garbage])
        return
    count, freed = ws.collect(keep)
    OPTIONS.emit({"removed": count, "bytes": freed}, "workspace gc", ["removed", "freed"], [[count, _size(freed)]])


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
