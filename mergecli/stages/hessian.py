"""hessian stage: per fine-tune, H = X^T X of every linear layer's inputs on its own calibration data.

The spec of a Hessian set holds the fingerprint of the model that ran (the fine-tune, or the base
with `source: base`), the base's (a LoRA runs merged into it; its tokenizer is the fallback), the
dataset's fingerprint (files' sizes and digests) and every calibration setting that can change H
(not batch size or the runner: they only change the summation order).
"""

from __future__ import annotations

from typing import Any, Callable

from ..store.artifacts import ArtifactSpec, DataFingerprint
from ..fsutil import size_text
from ..engine.hessian_set import HessianSet
from ..errors import MergeCliError
from ..recipe.schema import ModelSpec, key_view
from .base import Context, Option, Stage, View

from ..store.coordinate import Claim, claim


class HessianSpec(ArtifactSpec):
    kind = "hessian"
    format = 4  # 4: the input embedding's token counts
    model: str
    base: str
    dataset: DataFingerprint
    calibration: dict[str, Any]
    draw: str  # how the windows are drawn from the documents (`calibration.DRAW`)


def spec_of(ctx: Context, model: ModelSpec) -> HessianSpec:
    from ..engine.calibration import DRAW  # start-up time (torch)
    from ..recipe.datasets import fingerprint

    cal = ctx.recipe.calibration
    ran = ctx.base if cal.source == "base" else ctx.source(model.model)
    assert model.dataset is not None
    return HessianSpec(model=ran.fingerprint, base=ctx.base.fingerprint,
                       dataset=fingerprint(model.dataset, ctx.recipe.root),
                       calibration=key_view(cal, exclude={"general"}), draw=DRAW)  # general: lambda: learned's


def check_context(ctx: Context, seq_len: int, field: str) -> None:
    """Windows longer than the model's position embeddings are an error, not an index crash."""
    if ctx.arch.context is not None and seq_len > ctx.arch.context:
        raise MergeCliError(f"{field}: {seq_len} tokens is longer than the model's context of {ctx.arch.context}",
                            f"set {field} to at most {ctx.arch.context}")


def hessian_sets(ctx: Context, models: list[ModelSpec]) -> list[HessianSet]:
    """Calibration statistics of `models`, collected where missing.

    Under torchrun the missing ones are shared out: whole rounds of one fine-tune per process,
    each collected and written by its process alone (no H crosses the network), then the few
    left over (fewer than the processes) one at a time by all processes together, each taking a
    contiguous part of the windows; rank 0 adds up the parts and writes. One process: every
    fine-tune is a round of its own."""
    if not models:
        return []
    for model in models:
        if model.dataset is None:
            raise MergeCliError(f"models.{model.name}.dataset is needed for calibration statistics")
    check_context(ctx, ctx.recipe.calibration.seq_len, "calibration.seq_len")
    specs = [spec_of(ctx, m) for m in models]
    with claim(ctx.workspace, ctx.dist, specs, [f"hessian {m.name}" for m in models]) as step:
        missing = step.missing
        rounds = len(missing) - len(missing) % ctx.dist.world
        alone, together = missing[:rounds], missing[rounds:]
        if alone:
            with ctx.reporter.track(f"hessians {', '.join(models[i].name for i in alone)}",
                                    _steps(ctx) * len(alone)) as advance:
                for index in alone[ctx.dist.rank::ctx.dist.world]:
                    _collect(ctx, models[index], step, index, advance, shared=False)
        for index in together:
            with ctx.reporter.track(f"hessians {models[index].name}", _steps(ctx)) as advance:
                _collect(ctx, models[index], step, index, advance, shared=True)
        found = step.settle()
    for model, (_, reused) in zip(models, found):
        ctx.reporter.log(f"hessians [bold]{model.name}[/]: " + ("reused from the workspace cache" if reused else "collected"))
    return [HessianSet(model.name, artifact, reused) for model, (artifact, reused) in zip(models, found)]


def _steps(ctx: Context) -> int:
    """Progress units of one fine-tune: its windows (once per decoder block, layer by layer)."""
    cal = ctx.recipe.calibration
    return cal.samples * ((ctx.arch.num_layers or 1) if cal.layer_by_layer else 1)


def _collect(ctx: Context, model: ModelSpec, step: Claim, index: int, advance: Callable[[int], None],
             shared: bool) -> None:
    """One fine-tune's statistics, written by this process (layer by layer each block's H as soon
    as it is done); `shared`: this process's part of the windows, added up with the other
    processes' parts and written by rank 0 (every H held until they are added up)."""
    from ..engine.hessians import collect_into, collect_windows, combine, prepare, write_hessians  # start-up time

    assert model.dataset is not None
    cal = ctx.recipe.calibration
    prepared = prepare(model.name, ctx.source(model.model), ctx.base.path, ctx.arch, model.dataset, ctx.recipe.root,
                       cal, ctx.torch_device, ctx.workspace.root, ctx.reporter)
    if not shared:
        step.build(index, lambda folder: collect_into(folder, prepared, cal, ctx.torch_device, advance))
        return
    stats = combine(collect_windows(prepared, ctx.dist.share(cal.samples), cal, ctx.torch_device, advance), ctx.dist)
    if ctx.dist.main:
        step.build(index, lambda folder: write_hessians(folder, prepared, stats))


def calibrated(ctx: Context) -> list[ModelSpec]:
    return [m for m in ctx.recipe.models if m.dataset is not None]


def run(ctx: Context) -> list[HessianSet]:
    """Collect (or reuse) calibration statistics for every fine-tune with a dataset."""
    chosen = calibrated(ctx)
    if not chosen:
        raise MergeCliError("no fine-tune in the recipe has a dataset to calibrate on",
                            "add models.N.dataset: {path: ..., text_field: text}")
    ctx.torch_device  # fail on a bad --device before any model is loaded
    return hessian_sets(ctx, chosen)


def show(sets: list[HessianSet]) -> View:
    data = [{"model": h.model, "key": h.artifact.key, "reused": h.reused, "bytes": h.artifact.size,
             "tokens": h.meta["tokens"], "groups": len(h.meta["groups"]), "layers": len(h.meta["members"]),
             "dataset": h.meta["dataset"], "path": str(h.artifact.path)} for h in sets]
    rows = [[d["model"], d["dataset"], d["tokens"], d["layers"], d["groups"], size_text(d["bytes"]),
             "reused" if d["reused"] else "collected"] for d in data]
    return View("hessians", ["model", "dataset", "tokens", "linear layers", "groups", "size", "status"], rows, data)


STAGE = Stage(
    "hessian", "Collect per-layer H = X^T X from each fine-tune's calibration data (for sparsegpt, wanda, regmean).",
    run=run, show=show, order=20, plan=lambda ctx: [spec_of(ctx, m) for m in calibrated(ctx)],
    options=(
        Option("samples", int, None, "calibration windows per fine-tune (recipe default: 128)",
               override="calibration.samples"),
        Option("seq_len", int, None, "tokens per window (recipe default: 512)", override="calibration.seq_len"),
        Option("batch_size", int, None, "windows per forward pass (recipe default: 4)", override="calibration.batch_size"),
        Option("layer_by_layer", bool, None, "one decoder block on the device at a time",
               flags=("--layer-by-layer/--whole-model",), override="calibration.layer_by_layer"),
        Option("source", str, None, "collect on each 'finetune' (default) or on the 'base'",
               override="calibration.source"),
    ))
