"""taskvec stage: tau = theta_ft - theta_base for every fine-tune, checked and cached.

The spec of a task vector holds the base's and the fine-tune's fingerprints and every field of
the fine-tune's recipe entry that can change it (`extra_tokens`, `check_base`, ...: all of them
but its name, weight and dataset, which reach other artifacts instead).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..store.artifacts import ArtifactSpec
from ..fsutil import size_text
from ..recipe.schema import ModelSpec, key_view
from .base import Context, Stage, View

if TYPE_CHECKING:
    from ..engine.taskvectors import TaskVector
    from ..store.workspace import Artifact


class TaskVectorSpec(ArtifactSpec):
    kind = "taskvec"
    format = 4
    base: str
    model: str
    entry: dict[str, Any]  # the fine-tune's recipe entry, less what reaches other artifacts
    extra_tokens: str


@dataclass(frozen=True)
class Computed:
    """A task vector with where it came from (for the table and `--json`)."""

    vector: "TaskVector"
    artifact: "Artifact"
    reused: bool


def spec_of(ctx: Context, model: ModelSpec) -> TaskVectorSpec:
    return TaskVectorSpec(base=ctx.base.fingerprint, model=ctx.source(model.model).fingerprint,
                          entry=key_view(model, exclude={"name", "weight", "dataset"}),
                          extra_tokens=ctx.recipe.rows_rule)


def task_vector(ctx: Context, model: ModelSpec) -> Computed:
    from ..engine.taskvectors import TaskVector, build_task_vector  # start-up time (torch)

    source = ctx.source(model.model)

    def produce(folder) -> None:
        build_task_vector(folder, model.name, source, ctx.base, ctx.arch, ctx.recipe.rows_rule,
                          model.check_base, ctx.recipe.base, ctx.reporter)

    artifact, reused = ctx.get_or_build(spec_of(ctx, model), f"taskvec {model.name}", produce)
    vector = TaskVector(model.name, source.kind, artifact.path, source.path)
    how = "read from the fine-tune at merge time" if vector.by_reference else "materialized"
    ctx.reporter.log(f"task vector [bold]{model.name}[/] ({source.kind}, {how}): "
                     + ("reused from the workspace cache" if reused else "computed"))
    return Computed(vector, artifact, reused)


def run(ctx: Context) -> list[Computed]:
    """Compute (or reuse) the task vector of every fine-tune in the recipe."""
    return [task_vector(ctx, model) for model in ctx.recipe.models]


def show(results: list[Computed]) -> View:
    data = [{"model": c.vector.model, "kind": c.vector.kind, "key": c.artifact.key, "path": str(c.artifact.path),
             "reused": c.reused, "bytes": c.artifact.size, "tensors": c.vector.tensors} for c in results]
    rows = [[d["model"], d["kind"], d["tensors"], size_text(d["bytes"]), "reused" if d["reused"] else "computed",
             d["key"]] for d in data]
    return View("task vectors", ["model", "kind", "tensors", "size", "status", "cache key"], rows, data)


STAGE = Stage("taskvec", "Compute each fine-tune's task vector (fine-tune minus base) into the workspace cache.",
              run=run, show=show, order=10, plan=lambda ctx: [spec_of(ctx, m) for m in ctx.recipe.models])
