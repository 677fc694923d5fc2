"""What every stage needs from a recipe: its workspace, the resolved base and fine-tunes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import MergeCliError, ModelMismatchError
from ..models.architecture import Architecture, describe
from ..models.reference import ModelSource, resolve_model
from ..models.support import TINY_CONFIGS
from ..progress import Reporter
from ..recipe import Recipe
from ..workspace import Workspace


@dataclass
class Context:
    recipe: Recipe
    workspace: Workspace
    reporter: Reporter
    base: ModelSource
    arch: Architecture
    _sources: dict[str, ModelSource] = field(default_factory=dict)

    def source(self, ref: str) -> ModelSource:
        """A fine-tune's resolved source, looked up once per run (a hub id costs a request)."""
        if ref not in self._sources:
            self._sources[ref] = resolve_model(ref, self.recipe.root)
        return self._sources[ref]


def open_context(recipe: Recipe, reporter: Reporter, wait: bool = True) -> Context:
    base = resolve_model(recipe.base, recipe.root)
    if base.kind != "full":
        raise ModelMismatchError(f"base: {base.path} is a LoRA adapter; the base must be a full model")
    workspace = Workspace(recipe.workspace_path, wait=wait, log=reporter.log)
    arch = describe(base.path)
    if arch.model_type not in TINY_CONFIGS:
        reporter.log(f"[yellow]warning:[/] model_type {arch.model_type!r} is not among the tested architectures "
                     f"({', '.join(TINY_CONFIGS)}); inferred from the model class: {len(arch.linear)} linear weights, "
                     f"{len(arch.transposed)} stored in x out, tied: {arch.tied or 'none'}")
    return Context(recipe, workspace, reporter, base, arch)


def check_device(device: str) -> torch.device:
    """Fail early and clearly when the requested accelerator is absent."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise MergeCliError(f"unknown device {device!r}", "use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise MergeCliError(f"device {device!r} requested but no such CUDA device is available", "use --device cpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise MergeCliError("device 'mps' requested but MPS is not available", "use --device cpu")
    return dev


def output_folder_is_ours(folder: Path, stamp: str) -> bool:
    return not folder.exists() or (folder / stamp).is_file() or not any(folder.iterdir())
