"""The `mergecli` command: thin Typer commands over the Python API.

One command per stage is generated from the stage list (its options become flags); `validate`,
`recipes`, `ws`, `demo` and `archs` are written out here. Each command parses its arguments, calls
the library, and renders the result (a Rich table, or JSON on stdout with --json). Errors the
user can fix print as one line with a hint; tracebacks only with --debug.

Loading this module imports no torch, so `--help` and `archs` answer at once.
"""

from __future__ import annotations

import errno
import functools
import inspect
import json
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NoReturn, Optional

import typer
from rich.console import Console
from rich.markup import escape

from ..version import __version__
from .display import RichReporter, table
from .moe import run_moe, show_moe
from ..fsutil import size_text
from ..distributed import DEFAULT_TIMEOUT, SINGLE, Group, PeerFailed, join
from ..errors import MergeCliError, UsageError
from ..fsutil import folder_bytes
from ..recipe.schema import Recipe
from ..recipe.load import load_recipe, recipes_dir, validate_recipe
from ..stages import stages
from ..stages.base import Context, Stage, View
from ..recipe.mergekit import import_config
from ..quality.report import comparison, comparison_text, plot, render
from ..stages.compare import comparison_view
from ..models.architectures import TESTED
from ..store.workspace import Workspace

app = typer.Typer(help="Merge fine-tuned language models: task vectors, Hessians, merges, evaluation.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
recipes_app = typer.Typer(help="List and copy the built-in recipes; import mergekit configs.", no_args_is_help=True)
ws_app = typer.Typer(help="Inspect and clean the workspace cache.", no_args_is_help=True)
app.add_typer(recipes_app, name="recipes")
app.add_typer(ws_app, name="ws")

OVERRIDES = typer.Argument(None, help="recipe overrides, e.g. density=0.3 merges.ties.seed=1", show_default=False,
                           metavar="KEY=VALUE")
RECIPE = typer.Argument(..., help="YAML recipe file (or a mergekit config)", show_default=False, metavar="RECIPE")
# the options every command takes, before or after the command's name (`main` moves them to the front)
GLOBAL_SWITCHES = ("-q", "--quiet", "--json", "--debug", "--wait", "--no-wait", "--version")
GLOBAL_VALUES = ("-w", "--workspace", "--device", "--backend", "--dist-timeout")


@dataclass
class Options:
    workspace: Optional[Path] = None
    quiet: bool = False
    json: bool = False
    device: str = "cpu"
    debug: bool = False
    wait: bool = True
    group: Group = SINGLE  # the torchrun process group, if launched by torchrun

    @property
    def out(self) -> Console:
        return Console()

    @property
    def err(self) -> Console:
        return Console(stderr=True)

    @property
    def reporter(self) -> RichReporter:
        return RichReporter(self.err, quiet=self.quiet or self.json)

    def recipe(self, path: Path, overrides: list[str] | None, check_paths: bool = True) -> Recipe:
        extra = [f"workspace={self.workspace.absolute()}"] if self.workspace else []
        return load_recipe(path, list(overrides or []) + extra, check_paths=check_paths, log=self.reporter.log)

    def context(self, recipe: Recipe) -> Context:
        return Context(recipe, self.reporter, self.device, self.wait, self.group)

    def emit(self, shown: View | str) -> None:
        if not self.group.main:  # under torchrun rank 0 prints the result
            return
        if isinstance(shown, str):
            typer.echo(shown, nl=False)
        elif self.json:
            typer.echo(json.dumps(shown.data, indent=2, default=str, allow_nan=False))
        elif not self.quiet:
            self.out.print(table(shown.title, shown.columns, shown.rows, width=self.out.width))


OPTIONS = Options()


@app.callback(invoke_without_command=True)
def main_options(
    ctx: typer.Context,
    workspace: Optional[Path] = typer.Option(None, "--workspace", "-w", metavar="DIR",
                                             help="workspace folder (overrides the recipe's)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", metavar="", help="no progress bars or logs"),
    json_output: bool = typer.Option(False, "--json", metavar="", help="machine-readable result on stdout"),
    device: str = typer.Option("cpu", "--device", metavar="DEVICE",
                               help="torch device for the math: cpu, cuda, cuda:1, mps"),
    debug: bool = typer.Option(False, "--debug", metavar="", help="show tracebacks"),
    wait: bool = typer.Option(True, "--wait/--no-wait", metavar="",
                              help="wait for, or fail on, another run holding a lock"),
    backend: Optional[str] = typer.Option(None, "--backend", metavar="NAME", help="under torchrun: process-group "
                                          "backend (default nccl with --device cuda, else gloo)"),
    dist_timeout: float = typer.Option(DEFAULT_TIMEOUT, "--dist-timeout", min=1, metavar="SECONDS", help="under "
                                       "torchrun: seconds a process waits for the others before failing"),
    version: bool = typer.Option(False, "--version", metavar="", help="print the version and exit", is_eager=True),
) -> None:
    if version:
        typer.echo(f"mergecli {__version__}")
        raise typer.Exit()
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())
        raise typer.Exit()
    OPTIONS.__init__(workspace, quiet, json_output, device, debug, wait)
    try:
        OPTIONS.group = group = join(device, backend, dist_timeout)
        if group.launched and group.main:
            OPTIONS.reporter.log(f"torchrun: {group.world} process(es), backend {group.backend}")
        if group.world > 1 and ctx.invoked_subcommand not in stages():
            raise UsageError(f"`{ctx.invoked_subcommand}` runs in one process; only the stages "
                                f"({', '.join(stages())}) are shared out under torchrun", "run it without torchrun")
    except MergeCliError as exc:
        raise typer.Exit(report(exc)) from None


def command(fn: Callable[..., None]) -> Callable[..., None]:
    """Turn the user's errors into one line on stderr and an exit code; real bugs too, unless --debug."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except KeyboardInterrupt:
            _interrupted()
        except Exception as exc:  # noqa: BLE001
            if OPTIONS.debug:
                raise
            if INTERRUPTED:  # a library turned the KeyboardInterrupt into an error of its own
                _interrupted()
            raise typer.Exit(report(exc)) from None
    return wrapper


def _interrupted() -> NoReturn:
    OPTIONS.err.print("[red]interrupted[/]: nothing half-written is kept; rerun to resume", highlight=False)
    raise typer.Exit(130)


def report(exc: BaseException) -> int:
    """Print an error as one line (and its hint); the exit code. Under torchrun, the first process
    with a given error prints it, naming its rank."""
    message, hint, code = explain(exc)
    group = OPTIONS.group
    if not group.should_print(message, consequence=isinstance(exc, PeerFailed)):
        return code or 1
    where = f"rank {group.rank} of {group.world}: " if group.launched else ""
    OPTIONS.err.print(f"[bold red]{'Error' if code else 'Internal error'}:[/] {where}{escape(message)}",
                      highlight=False, soft_wrap=True)
    if hint:
        OPTIONS.err.print(f"[dim]hint: {escape(hint)}[/]", highlight=False, soft_wrap=True)
    return code or 1


def explain(exc: BaseException) -> tuple[str, str | None, int]:
    """(message, hint, exit code) for an error; exit code 0 means a bug (printed as 'Internal error')."""
    if isinstance(exc, MergeCliError):
        return exc.message, exc.hint, exc.exit_code
    if isinstance(exc, OSError):  # the file system said no: a full disk, permissions, a missing folder
        where = f": {exc.filename}" if exc.filename else ""
        hint = "free some space; nothing half-written was kept" if exc.errno == errno.ENOSPC else None
        return f"{exc.strerror or exc}{where}", hint, 1
    return f"{type(exc).__name__}: {exc}", "rerun with --debug for the traceback, and report it", 0


# -- stages: one command each, generated ----------------------------------------------------
def _stage_command(stage: Stage) -> None:
    def run(recipe: Path, overrides: Optional[list[str]] = None, **options: Any) -> None:
        extra = [f"{o.override}={_yaml_value(options[o.name])}" for o in stage.options
                 if o.override and options.get(o.name) is not None]
        given = {o.name: options[o.name] for o in stage.options if not o.override}
        ctx = OPTIONS.context(OPTIONS.recipe(recipe, list(overrides or []) + extra))
        OPTIONS.emit(stage.show(stage.run(ctx, **given)))

    params = [inspect.Parameter("recipe", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=RECIPE, annotation=Path),
              inspect.Parameter("overrides", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=OVERRIDES,
                                annotation=Optional[list[str]])]
    for option in stage.options:
        annotation = Optional[option.type] if option.default is None else option.type
        params.append(inspect.Parameter(option.name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                        default=typer.Option(option.default, *option.cli_flags, help=option.help,
                                                             min=option.minimum, metavar=option.cli_metavar)))
    run.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    run.__annotations__ = {p.name: p.annotation for p in params}
    run.__doc__ = stage.summary
    app.command(name=stage.name, help=stage.summary)(command(run))


def _yaml_value(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


for _stage in stages().values():
    _stage_command(_stage)


# -- recipes --------------------------------------------------------------------------------
@app.command()
@command
def validate(recipe: Path = RECIPE, overrides: Optional[list[str]] = OVERRIDES) -> None:
    """Check a recipe (schema, values, paths) without opening any model."""
    resolved = OPTIONS.recipe(recipe, overrides)
    rows = [[m.name, m.method, ", ".join(f"{k} {v}" for k, v in m.params.items()) or "-"] for m in resolved.merges]
    if OPTIONS.json:
        data = resolved.model_dump(mode="json", by_alias=True, exclude_none=True)
        typer.echo(json.dumps({"valid": True, "recipe": data}, indent=2, allow_nan=False))
        return
    if not OPTIONS.quiet:
        OPTIONS.err.print(f"[green]recipe {escape(str(recipe))} is valid[/]: base {escape(resolved.base)}, "
                          f"{len(resolved.models)} fine-tune(s), {len(resolved.merges)} merge(s)")
        OPTIONS.out.print(table("merges", ["name", "method", "parameters"], rows))


def builtin_recipes() -> dict[str, Path]:
    """The built-in recipes by name."""
    return {p.stem: p for p in sorted(recipes_dir().glob("*.yaml"))}


@recipes_app.command("ls")
@command
def recipes_ls() -> None:
    """List the built-in recipes."""
    found = builtin_recipes()
    rows = [[name, _description(path)] for name, path in found.items()]
    OPTIONS.emit(View("built-in recipes (copy one with `mergecli recipes cp NAME DEST`)", ["name", "description"],
                      rows, {name: {"path": str(p), "description": _description(p)} for name, p in found.items()}))


@recipes_app.command("cp")
@command
def recipes_cp(name: str = typer.Argument(..., help="built-in recipe name"),
               dest: Path = typer.Argument(..., help="file or folder to copy it to")) -> None:
    """Copy a built-in recipe to edit it."""
    found = builtin_recipes()
    if name not in found:
        raise UsageError(f"no built-in recipe named {name!r}", f"choose one of: {', '.join(found)}")
    target = dest / f"{name}.yaml" if dest.is_dir() else dest
    if target.exists() or target.is_symlink():
        raise MergeCliError(f"{target} already exists", "choose another destination")
    if not target.parent.is_dir():
        raise MergeCliError(f"cannot copy to {target}: folder {target.parent} does not exist", "create it first")
    target.write_bytes(found[name].read_bytes())
    OPTIONS.reporter.log(f"copied {name} to {target}")


@recipes_app.command("import")
@command
def recipes_import(config: Path = typer.Argument(..., help="mergekit YAML config (merge_method: ...)"),
                   output: Optional[Path] = typer.Option(None, "--output", "-o",
                                                         help="recipe file to write (default: print it)")) -> None:
    """Translate a mergekit config into a mergecli recipe (any command also takes the config itself)."""
    import yaml


    dest = (output.absolute().parent if output else config.absolute().parent)
    translation = import_config(config, dest)
    recipe = validate_recipe(translation.recipe, dest, source=str(config), path=config.absolute())
    for note in translation.notes:
        OPTIONS.reporter.log(note)
    text = f"# imported from the mergekit config {config.name} by mergecli {__version__}\n" + \
        yaml.safe_dump(translation.recipe, sort_keys=False)
    if output is None:
        typer.echo(text, nl=False)
        return
    if output.exists() or output.is_symlink():
        raise MergeCliError(f"{output} already exists; it is left untouched", "choose another --output")
    if not output.parent.is_dir():
        raise MergeCliError(f"cannot write {output}: folder {output.parent} does not exist", "create it first")
    OPTIONS.context(recipe).guard(output, "recipe file")
    with open(output, "x") as handle:  # exclusive: never replaces a file that appeared meanwhile
        handle.write(text)
    OPTIONS.reporter.log(f"wrote {output}; run it with `mergecli merge {output}`")


def _description(path: Path) -> str:
    first = path.read_text().splitlines()[0] if path.stat().st_size else ""
    return first.lstrip("# ").strip()


# -- mixtures of experts ---------------------------------------------------------------------
@app.command()
@command
def moe(config: Path = typer.Argument(..., help="mergekit-moe YAML config (base_model, experts, gate_mode...)",
                                      show_default=False, metavar="CONFIG"),
        output: Optional[Path] = typer.Option(None, "--output", "-o", metavar="DIR",
                                              help="folder to write (default: merged/<config name>/ beside it)"),
        seed: int = typer.Option(0, "--seed", metavar="N", help="gate_mode random / uniform_random: the draw "
                                 "(mergekit-moe's --random-seed)"),
        overwrite: bool = typer.Option(False, "--overwrite", metavar="",
                                        help="rebuild even when the folder is current")) -> None:
    """Build a mixture of experts (Mixtral, or Qwen2-MoE with a shared expert) from a mergekit-moe config."""
    OPTIONS.emit(show_moe(run_moe(config, output, reporter=OPTIONS.reporter, device=OPTIONS.device, seed=seed,
                                  overwrite=overwrite, wait=OPTIONS.wait)))


# -- the demo and the architecture table ----------------------------------------------------
@app.command()
@command
def demo(workdir: Path = typer.Option(Path("mergecli-demo"), "--workdir", help="where the demo's models and results go"),
         overrides: Optional[list[str]] = OVERRIDES) -> None:
    """The whole pipeline on SmolLM2-135M-Instruct with three home-made fine-tunes; no model hub needed."""
    from .demo import run_demo  # start-up time: the demo imports torch, --help should not

    recipe, results = run_demo(workdir, OPTIONS.reporter, OPTIONS.device, OPTIONS.wait, overrides)
    rows = comparison(results)
    (workdir / "compare.json").write_text(comparison_text(rows, "json"))
    (workdir / "compare.md").write_text(comparison_text(rows, "markdown"))
    plot(rows, workdir / "compare.png")
    OPTIONS.emit(comparison_view(rows))
    if not OPTIONS.json:
        OPTIONS.err.print(f"results in {workdir}/compare.(json|md|png) (the folder holds "
                          f"{size_text(folder_bytes(workdir))}); rerun any stage with "
                          f"`mergecli <stage> {workdir / 'recipe.yaml'}`", soft_wrap=True)


@app.command()
@command
def archs(fmt: str = typer.Option("table", "--format", help="table | markdown | json")) -> None:
    """The architectures tested end to end, and what mergecli reads off each."""

    rows = [a.row() for a in TESTED]
    if fmt in ("markdown", "json"):
        typer.echo(render(rows, fmt), nl=False)
    elif fmt == "table":
        OPTIONS.emit(View("tested architectures", list(rows[0]), [list(r.values()) for r in rows], rows))
    else:
        raise UsageError(f"unknown --format {fmt!r}", "use table, markdown or json")


# -- workspace ------------------------------------------------------------------------------
def _workspace(recipe: Optional[Recipe]):

    if OPTIONS.workspace:
        if OPTIONS.workspace.exists() and not OPTIONS.workspace.is_dir():
            raise MergeCliError(f"workspace {OPTIONS.workspace} is a file, not a folder")
        return Workspace(OPTIONS.workspace.absolute(), log=OPTIONS.reporter.log)
    if recipe is None:
        raise UsageError("which workspace?", "pass a recipe, or --workspace PATH")
    return OPTIONS.context(recipe).workspace


def used_by(recipe: Recipe) -> set[str]:
    """Keys of every artifact the recipe's stages produce or reuse (derived from their plans)."""
    ctx = OPTIONS.context(recipe)
    return {spec.key() for stage in stages().values() for spec in stage.plan(ctx)}


@ws_app.command("ls")
@command
def ws_ls(recipe: Optional[Path] = typer.Argument(None, help="recipe whose workspace to list (and mark what it uses)")) -> None:
    """List cached artifacts with their sizes."""
    loaded = OPTIONS.recipe(recipe, None) if recipe else None
    ws = _workspace(loaded)
    used = used_by(loaded) if loaded else set()
    artifacts = sorted(ws.artifacts(), key=lambda a: (a.kind, a.label))
    data = [{"kind": a.kind, "key": a.key, "label": a.label, "bytes": a.size, "path": str(a.path),
             **({"used": a.key in used} if loaded else {})} for a in artifacts]
    # one readable row per artifact; the keys (20 hex digits) are in --json
    rows = [[a.kind, a.label, size_text(a.size), *(["yes" if a.key in used else ""] if loaded else [])]
            for a in artifacts]
    rows.append(["total", "", size_text(sum(a.size for a in artifacts)), *([""] if loaded else [])])
    OPTIONS.emit(View(f"workspace {ws.root}", ["kind", "what", "size", *(["used"] if loaded else [])], rows, data))


@ws_app.command("gc")
@command
def ws_gc(recipes: list[Path] = typer.Argument(..., help="recipes whose artifacts to keep"),
          dry_run: bool = typer.Option(False, "--dry-run", help="only list what would be removed")) -> None:
    """Remove cached artifacts that none of the given recipes uses (and leftovers of killed runs).

    Only what mergecli made is ever removed: its manifest entries and marked folders in its own
    artifact folders; anything else in or around the workspace is left alone."""
    loaded = [OPTIONS.recipe(r, None) for r in recipes]
    ws = _workspace(loaded[0])
    keep: set[str] = set()
    for recipe in loaded:
        keep |= used_by(recipe)
    if dry_run:
        garbage = ws.garbage(keep)
        OPTIONS.emit(View("would remove", ["path"], [[p] for p in garbage], [str(p) for p in garbage]))
        return
    count, freed = ws.collect(keep)
    OPTIONS.emit(View("workspace gc", ["removed", "freed"], [[count, size_text(freed)]],
                      {"removed": count, "bytes": freed}))


INTERRUPTED = False


def _on_sigint(signum: int, frame: Any) -> None:
    """First Ctrl-C: unwind (temporary folders are removed on the way out). A second one while
    that runs: leave at once; the next run removes what is left."""
    global INTERRUPTED
    if INTERRUPTED:
        os._exit(130)
    INTERRUPTED = True
    raise KeyboardInterrupt


def global_options_first(argv: list[str]) -> list[str]:
    """The arguments with the global options moved before the command's name: `mergecli validate
    r.yaml --json` means what `mergecli --json validate r.yaml` means (people put flags last)."""
    moved, rest = [], []
    args = iter(argv)
    for arg in args:
        if arg == "--":
            rest += [arg, *args]
            break
        name = arg.split("=", 1)[0]
        if rest and name in GLOBAL_SWITCHES:
            moved.append(arg)
        elif rest and name in GLOBAL_VALUES:
            moved.append(arg)
            if "=" not in arg:
                moved.append(next(args, ""))
        else:
            rest.append(arg)
    command = next((i for i, a in enumerate(rest) if not a.startswith("-")), len(rest))
    return rest[:command] + moved + rest[command:]


def main() -> None:
    """Entry point: Ctrl-C at any moment is one line and exit code 130."""
    signal.signal(signal.SIGINT, _on_sigint)
    try:
        app(global_options_first(sys.argv[1:]))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except SystemExit as done:
        if not done.code:  # a process group in error is left to the exit (nccl's teardown can hang)
            OPTIONS.group.close()
        raise


if __name__ == "__main__":
    main()
