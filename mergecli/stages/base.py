"""What a stage is, and the context every stage runs in.

A stage is one module of this package that defines `STAGE = Stage(...)`: its name (the command
and the `run_<name>` API function), the options it takes, how its result is shown, what it
produces for a recipe (`plan`: the artifact specs `ws ls`/`ws gc` derive from), and `run`. The
CLI, the Python API and the exports are generated from the stages `stages.stages()` finds, so a
new stage is one new module.

Stage modules stay cheap to import (no torch at module level): the CLI builds its commands and
`--help` from them without loading any model code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..distributed import SINGLE, Group, SharedProgress
from ..errors import MergeCliError, ModelMismatchError, UsageError
from ..fsutil import overlaps, real
from ..progress import SILENT, Reporter
from ..store.coordinate import get_or_build
from ..store.workspace import Artifact, Workspace
from ..models.reference import resolve_model, resolve_reference
from ..models.architecture import describe
from ..models.architectures import TESTED_TYPES

if TYPE_CHECKING:
    import torch

    from ..models.architecture import Architecture
    from ..models.reference import ModelSource
    from ..recipe.datasets import DatasetSpec
    from ..recipe.schema import Recipe
    from ..store.artifacts import ArtifactSpec


@dataclass(frozen=True)
class Option:
    """A stage option: a keyword argument of `run`, a `--flag` of its command. With `override`, the
    command sets that recipe field instead (`--samples 64` is `calibration.samples=64`)."""

    name: str
    type: Any
    default: Any
    help: str
    flags: tuple[str, ...] = ()
    override: str | None = None
    minimum: int | None = None
    metavar: str | None = None  # what --help shows after the flag (default: by type; nothing for a switch)

    @property
    def cli_flags(self) -> tuple[str, ...]:
        return self.flags or (f"--{self.name.replace('_', '-')}",)

    @property
    def cli_metavar(self) -> str:
        if self.metavar is not None:
            return self.metavar
        return {bool: "", int: "N", Path: "FILE"}.get(self.type, "NAME" if self.type == list[str] else "TEXT")


@dataclass(frozen=True)
class View:
    """A result as the CLI shows it: a table (title, columns, rows), and the data `--json` prints."""

    title: str
    columns: list[str]
    rows: list[list[Any]]
    data: Any


@dataclass(frozen=True)
class Stage:
    name: str
    summary: str
    run: Callable[..., Any]  # run(ctx, **options) -> result
    show: Callable[[Any], View | str]  # a str is printed as it is (csv, markdown)
    order: int  # position in the pipeline (taskvec 10 ... compare 50)
    plan: Callable[["Context"], list["ArtifactSpec"]] = lambda ctx: []
    options: tuple[Option, ...] = ()


@dataclass
class Context:
    """One run of one or more stages on one recipe: resolved models and the workspace are looked up
    once, and a stage that needs another's result (`need`) gets it computed once. `dist` is this
    process's group under torchrun (its reporter then shows one aggregate display, on rank 0)."""

    recipe: "Recipe"
    reporter: Reporter = SILENT
    device: str = "cpu"
    wait: bool = True
    dist: Group = SINGLE
    _sources: dict[str, "ModelSource"] = field(default_factory=dict)
    _results: dict[str, Any] = field(default_factory=dict)
    _texts: dict[tuple[str, str], list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.dist.launched:
            self.device = self.dist.local_device(self.device)
            self.reporter = SharedProgress(self.reporter, self.dist)

    # -- models -------------------------------------------------------------------------------
    def source(self, ref: str) -> "ModelSource":
        """A model reference resolved once per run (a hub id costs a request)."""

        if ref not in self._sources:
            self._sources[ref] = resolve_model(ref, self.recipe.root)
        return self._sources[ref]

    def provide(self, ref: str, source: "ModelSource") -> None:
        """Resolve `ref` to `source` from now on: an earlier stage's merged folder of a multi-stage
        recipe, fingerprinted by that merge's key (its folder need not exist yet)."""
        self._sources[ref] = source

    @cached_property
    def base(self) -> "ModelSource":
        base = self.source(self.recipe.base)
        if base.kind != "full":
            raise ModelMismatchError(f"base: {base.path} is a LoRA adapter; the base must be a full model")
        return base

    @cached_property
    def tokenizer(self) -> Any:
        """The base's tokenizer, read once per run: calibration and evaluation text is cut with it."""
        from ..models.loading import load_tokenizer  # start-up time (torch, transformers)

        return load_tokenizer(self.base.path)

    def texts(self, spec: "DatasetSpec", part: str = "calibration") -> list[str]:
        """A dataset's calibration or held-out documents (`engine.calibration.load_texts`), read
        once per run however many variants choose a scale on them or models are evaluated on them."""
        key = (spec.model_dump_json(), part)
        if key not in self._texts:
            from ..engine.calibration import load_texts  # start-up time (torch)

            self._texts[key] = load_texts(spec, self.recipe.root, self.tokenizer, part)
        return self._texts[key]

    @cached_property
    def arch(self) -> "Architecture":

        arch = describe(self.base.path)
        if arch.model_type not in TESTED_TYPES:
            self.reporter.log(f"[yellow]warning:[/] model_type {arch.model_type!r} is not among the tested "
                              f"architectures ({', '.join(sorted(TESTED_TYPES))}); inferred from the model class: "
                              f"{len(arch.linear)} linear weights, {len(arch.transposed)} stored in x out, "
                              f"tied: {arch.tied or 'none'}")
        return arch

    @cached_property
    def torch_device(self) -> "torch.device":
        return check_device(self.device)

    # -- where mergecli may write ---------------------------------------------------------------
    @cached_property
    def inputs(self) -> list[tuple[str, Path]]:
        """(what, real path) of every input: models, adapters, every dataset file read, lm-eval's tasks."""

        recipe = self.recipe
        found = []
        for what, ref in [("the base model", recipe.base)] + [(f"model {m.name!r}", m.model) for m in recipe.models]:
            if isinstance(resolve_reference(ref, recipe.root), Path):
                found += [(what, p) for p in self.source(ref).input_paths]
        for name, spec in recipe.read_datasets().items():
            for ref in [spec.path, *([spec.data_files] if isinstance(spec.data_files, str) else spec.data_files or [])]:
                location = resolve_reference(ref, recipe.root)
                if isinstance(location, Path) and location.exists():
                    found.append((f"dataset {name!r}", real(location)))
        harness = recipe.evaluation.lm_eval
        if harness and harness.include_path:
            found.append(("evaluation.lm_eval.include_path", real(recipe.root / harness.include_path)))
        return found

    def guard(self, target: Path, what: str, folder: bool = True) -> None:
        """Refuse to write `target` if it is, contains or is inside an input (real paths compared,
        symlinks included), or is the recipe file, or lies under a file; a `folder` target must not
        be a file."""
        guard_target(target, what, self.inputs, self.recipe.path, folder)

    @cached_property
    def workspace(self) -> Workspace:
        self.guard(self.recipe.workspace_path, "workspace")
        return Workspace(self.recipe.workspace_path, wait=self.wait, log=self.reporter.log)

    def get_or_build(self, spec: "ArtifactSpec", label: str, produce: Callable[[Path], None]) -> tuple[Artifact, bool]:
        """An artifact every process needs: reused, or built by `produce(folder)` (by rank 0 alone
        under torchrun); (artifact, reused)."""
        return get_or_build(self.workspace, self.dist, spec, label, produce)

    # -- other stages ---------------------------------------------------------------------------
    def need(self, stage: "Stage", **options: Any) -> Any:
        """Another stage's result, computed once per context."""
        if stage.name not in self._results:
            self._results[stage.name] = stage.run(self, **options)
        return self._results[stage.name]


def guard_target(target: Path, what: str, inputs: list[tuple[str, Path]], document: Path | None = None,
                 folder: bool = True) -> None:
    """`Context.guard` for any command: refuse `target` if it is, contains or is inside one of
    `inputs` ((what, real path)), or is the `document` (the recipe or config file: a folder beside
    it is fine), or lies under a file; a `folder` target must not be a file."""
    location = real(target)
    named = [("the recipe", real(document))] if document else []
    for name, path in inputs + named:
        if overlaps(location, path) and (name != "the recipe" or location == path):
            raise MergeCliError(f"{what} {target} {_relation(location, path)} {name} ({path}); "
                                "mergecli never writes into its inputs", f"choose another {what}")
    if folder and target.exists() and not target.is_dir():
        raise MergeCliError(f"{what} {target} is a file, not a folder")
    ancestor = location if folder else location.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise MergeCliError(f"{what} {target} lies under {ancestor}, which is a file")


def _relation(a: Path, b: Path) -> str:
    return "is" if a == b else "is inside" if a.is_relative_to(b) else "contains"


def check_device(device: str) -> "torch.device":
    """Fail early and clearly when the requested accelerator is absent or not a compute device."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"unknown device {device!r}", "use cpu, cuda, cuda:N or mps") from None
    if dev.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"device {device!r} cannot run a merge", "use cpu, cuda, cuda:N or mps")
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise MergeCliError(f"device {device!r} requested but no such CUDA device is available", "use --device cpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise MergeCliError("device 'mps' requested but MPS is not available", "use --device cpu")
    return dev
