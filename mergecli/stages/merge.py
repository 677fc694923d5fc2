"""merge stage: every variant of the recipe, written as a Hugging Face model folder (or, with
`output: lora`, a peft adapter of the base: same ownership, atomic build and stamp).

The spec of a merged folder holds the base's fingerprint, each merged model's recipe entry with
the keys of its task vector (and Hessians, when the method or score uses them), every field of the
variant (method parameters included) and every recipe-wide field; a new field reaches the key
without anyone listing it. The folder is built under a temporary name and renamed into place, so
it appears complete or not at all; its stamp (`mergecli.json`) records the key and each file's
size and head digest, and a rerun reuses the folder only if every file still matches.

Output folders are the user's territory: mergecli replaces a folder only if it made it (stamp or
marker) and it holds no file mergecli did not write; it never writes into an input; and one run at
a time writes a given folder (the lock lives beside the folder, whatever the workspace).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.markup import escape

from ..version import __version__
from ..store.artifacts import ArtifactSpec
from ..errors import MergeCliError, RecipeError, WorkspaceBusyError
from ..fsutil import OWNER_MARKER, building, file_record, is_owned, leftovers, locked, publish, record_problem
from ..methods.table import LEARNED
from ..recipe.schema import MergeSpec, Recipe, key_view
from . import hessian, taskvec
from .base import Context, Option, Stage, View

if TYPE_CHECKING:
    from ..engine.hessian_set import HessianSet

STAMP = "mergecli.json"
ROLE = "merged model"  # the marker inside every output folder


class MergedModelSpec(ArtifactSpec):
    kind = "merge"
    format = 4
    base: str
    inputs: tuple[dict[str, Any], ...]
    variant: dict[str, Any]
    recipe: dict[str, Any]


@dataclass
class MergeResult:
    name: str
    method: str
    params: dict[str, Any]
    path: Path
    reused: bool
    seconds: float
    kept_density: float
    tensors: int
    key: str
    models: list[str] = field(default_factory=list)
    output: str = "model"
    adapter: dict[str, Any] | None = None  # output: lora: the rank, and per module its rank and kept energy
    # lambda: auto: the value chosen and every candidate's score; lambda: learned: the scales
    search: dict[str, Any] | None = None
    # every tensor accounted for: merged, copied from the base (why), fine-tunes' buffers skipped
    account: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


def spec_of(ctx: Context, merge: MergeSpec) -> MergedModelSpec:
    inputs = tuple({"entry": key_view(m, exclude={"dataset"}), "taskvec": taskvec.spec_of(ctx, m).key(),
                    "hessian": hessian.spec_of(ctx, m).key() if merge.needs_stats else None}
                   for m in ctx.recipe.models_of(merge))
    from ..quality.search import key_of

    search = key_of(ctx, merge)  # lambda: auto also depends on the calibration text and settings
    return MergedModelSpec(base=ctx.base.fingerprint, inputs=inputs,
                           variant={**key_view(merge), **({"search": search} if search else {})},
                           recipe=key_view(ctx.recipe, exclude={"models", "merges", "calibration", "evaluation"}))


def run(ctx: Context, only: list[str] | None = None, overwrite: bool = False, workers: int = 2) -> list[MergeResult]:
    """Build every merge variant of the recipe (or those named in `only`); cached ones are reused.

    `workers` tensors are computed at once (threads, each with its share of torch's threads); the
    result does not depend on it. `overwrite` rebuilds a variant even when its folder is current."""
    recipe = ctx.recipe
    if workers < 1:
        raise MergeCliError(f"workers must be at least 1, got {workers}")
    if not recipe.merges:
        raise MergeCliError("the recipe has no merges", "add a 'merges:' list (see `mergecli recipes ls`)")
    variants = [recipe.merge(name) for name in dict.fromkeys(only)] if only else recipe.merges
    ctx.torch_device  # fail on a bad --device before any work
    for merge in variants:
        out = recipe.output_path / merge.name
        ctx.guard(out, "output folder")
        check_replaceable(out, read_stamp(out))
    check_settings(ctx, variants)
    vectors = {c.vector.model: c.vector for c in ctx.need(taskvec.STAGE)}
    needed = {m.name: m for merge in variants if merge.needs_stats for m in recipe.models_of(merge)}
    hessians = {h.model: h for h in hessian.hessian_sets(ctx, list(needed.values()))}
    results = []
    for merge in variants:
        models = recipe.models_of(merge)
        results.append(merge_variant(ctx, merge, [vectors[m.name] for m in models],
                                     [hessians[m.name] for m in models] if merge.needs_stats else None,
                                     overwrite, workers))
    return results


def check_settings(ctx: Context, variants: list[MergeSpec]) -> None:
    """A variant whose parameters or weights vary per tensor is checked on every tensor of the base
    before any work (the recipe could only check one-value settings)."""
    from ..methods.settings import settings_of
    from ..models.safetensors_io import Checkpoint

    for merge in variants:
        settings = settings_of(merge, ctx.recipe.models_of(merge))
        if settings.constant():
            continue
        with Checkpoint.open(ctx.base.path) as ckpt:
            names = sorted({ctx.arch.canonical(n) for n in ckpt.names()})
        try:
            settings.check_tensors(names, ctx.arch.layer_of, ctx.arch.num_layers)
        except ValueError as exc:
            index = ctx.recipe.merges.index(merge)
            raise RecipeError(f"merges.{index}.{exc}") from None


def merge_variant(ctx: Context, merge: MergeSpec, vectors: list, hessians: list["HessianSet"] | None,
                  overwrite: bool, workers: int) -> MergeResult:
    recipe = ctx.recipe
    spec = spec_of(ctx, merge)
    key = spec.key()
    out = recipe.output_path / merge.name
    try:  # under torchrun rank 0 holds the lock and decides; every rank writes its part
        with ctx.dist.lead(lambda: locked(out.parent / f".{merge.name}.lock", ctx.wait,
                           lambda: ctx.reporter.log(f"another run is writing {out}; waiting for it to finish"))):
            reused = ctx.dist.decide(lambda: _reusable(ctx, merge, out, key, overwrite))
            if reused:
                return reused
            result = _build(ctx, merge, vectors, hessians, workers, spec, out)
    except BlockingIOError:
        raise WorkspaceBusyError(f"another run is writing {out}", "wait for it, or rerun with --wait") from None
    ctx.reporter.log(f"merge [bold]{merge.name}[/]: wrote {out} in {result.seconds:.1f} s")
    return result


def _reusable(ctx: Context, merge: MergeSpec, out: Path, key: str, overwrite: bool) -> MergeResult | None:
    """The folder's result if it is current and intact; else None, the way cleared (temp folders
    of killed runs removed, a folder of ours checked replaceable). Call under the folder's lock."""
    for stale in leftovers(out.parent, ROLE, merge.name):
        shutil.rmtree(stale, ignore_errors=True)
    stamp = read_stamp(out)
    if stamp and stamp.get("key") == key and not overwrite:
        problem = stamp_problem(out, stamp)
        if problem is None:
            ctx.reporter.log(f"merge [bold]{merge.name}[/]: reused {out}")
            return MergeResult(**{**stamp["result"], "path": out, "reused": True})
        ctx.reporter.log(f"[yellow]merge {merge.name}: {out} is damaged ({problem}); rebuilding[/]")
    _clear_for(out, stamp)
    return None


def _build(ctx: Context, merge: MergeSpec, vectors: list, hessians: list["HessianSet"] | None, workers: int,
           spec: MergedModelSpec, out: Path) -> MergeResult:
    import torch

    from ..engine.hessians import HessianReader
    from ..engine.lora_out import write_merged_adapter
    from ..engine.writer import VariantPlan, write_variant
    from ..methods.settings import settings_of

    recipe = ctx.recipe
    models = recipe.models_of(merge)
    lora = merge.output == "lora"
    dtype = getattr(torch, merge.dtype) if merge.dtype else None
    search = None
    built = merge
    scales = None
    if merge.params.get("lambda") == LEARNED:
        from ..quality.learn import learn_scales
        from ..quality.search import with_param

        # under torchrun rank 0 learns and sends the scales, so every process builds the same merge
        search = ctx.dist.decide(lambda: learn_scales(ctx, merge, vectors, hessians, workers))
        ctx.reporter.log(f"merge [bold]{merge.name}[/]: scales per layer module and fine-tune learned on "
                         f"calibration windows (the merge keeps {100 * search.score:.1f}% of the gain on the "
                         f"selection windows; {100 * search.start:.1f}% at scale 1; on {escape(search.held_to)} "
                         f"{search.forgetting[search.kept]:+.4f} NLL from scale 1)")
        built = with_param(merge, "lambda", 1.0)
        scales = search.scales_of(ctx.arch)
    elif merge.searched:
        from ..quality.search import choose_lambda, with_param

        # under torchrun rank 0 searches and sends its choice, so every process builds the same merge
        search = ctx.dist.decide(lambda: choose_lambda(ctx, merge, vectors, hessians, workers))
        ctx.reporter.log(f"merge [bold]{merge.name}[/]: lambda {search.chosen:.3f} chosen on calibration windows "
                         f"(keeps {100 * search.score:.1f}% of the gain there)")
        built = with_param(merge, "lambda", search.chosen)
    plan = VariantPlan(
        settings=settings_of(built, models), vectors=vectors,
        readers=[HessianReader(h.artifact.path, merge.params.get("damp", 0.01), ctx.torch_device) for h in hessians]
        if hessians else None,
        dtype=torch.float32 if lora else dtype, clamp=merge.overflow == "clamp",
        extra_tokens=recipe.extra_tokens, shard_bytes=recipe.shard_bytes, scales=scales)
    label = f"merge {merge.name}"
    adapter = None
    result = None
    with ctx.dist.lead(lambda: building(out, ROLE)) as tmp:  # made by rank 0
        if not lora:  # every rank computes and writes the shards of its share of the tensors
            written = write_variant(tmp, plan, ctx.base.path, ctx.arch, [ctx.source(m.model).path for m in models],
                                    ctx.torch_device, workers, ctx.reporter, label, ctx.dist)
        elif ctx.dist.main:  # an adapter is factored by rank 0 alone; the others wait for it
            written, modules = write_merged_adapter(tmp, plan, ctx.base.path, recipe.resolve(recipe.base), ctx.arch,
                                                    ctx.torch_device, workers, ctx.reporter, label, merge.rank,
                                                    dtype or torch.float32)
            adapter = {"rank": merge.rank, "modules": {m: asdict(r) for m, r in modules.items()}}
            for module, r in modules.items():
                ctx.reporter.log(f"merge [bold]{merge.name}[/]: {module}: {r.kind}" + (
                    f" rank {r.rank}, energy kept {r.energy_kept:.4f}" if r.kind != "full" else " (saved whole)"))
        if ctx.dist.main:  # every rank's shards are complete: write_variant gathered from them
            for line in account_lines(written.account):
                ctx.reporter.log(f"merge [bold]{merge.name}[/]: {escape(line)}")
            if written.without_stats:
                ctx.reporter.log(f"merge [bold]{merge.name}[/]: {written.without_stats} tensors have no calibration "
                                 "statistics (no linear layer the hooks saw reads them: embeddings, norms, biases, the output layer, "
                                 "fused MoE experts) and used "
                                 + ("a weighted mean" if merge.method_spec.needs_stats else "magnitude scores"))
            seconds = written.seconds + (search.seconds if search else 0.0)
            result = MergeResult(merge.name, merge.method, merge.params, out, False, seconds,
                                 written.kept_density, written.tensors, spec.key(), [m.name for m in models],
                                 merge.output, adapter, search.as_dict() if search else None, written.account)
            (tmp / "mergecli_recipe.yaml").write_text(recipe.to_yaml())
            (tmp / "README.md").write_text(card_of(recipe, merge, result))
            files = {p.name: file_record(p) for p in sorted(tmp.iterdir()) if p.is_file() and p.name != OWNER_MARKER}
            (tmp / STAMP).write_text(json.dumps({"mergecli": __version__, "kind": f"merged-{merge.output}",
                                                 "key": spec.key(), "files": files, "result": result.as_dict()},
                                                indent=1))
            publish(tmp, out, owned=_ours)
    return ctx.dist.decide(lambda: result)  # rank 0's (its wall time) on every rank


def read_stamp(folder: Path) -> dict | None:
    """The stamp of a folder mergecli wrote, or None (absent, unreadable, or not ours)."""
    try:
        stamp = json.loads((folder / STAMP).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(stamp, dict) and isinstance(stamp.get("files"), (dict, list)) and isinstance(stamp.get("result"), dict)
    return stamp if ok else None


def stamp_problem(folder: Path, stamp: dict) -> str | None:
    files = stamp["files"]
    if not isinstance(files, dict):  # stamps of mergecli 0.1 listed names only
        return "its stamp predates file records"
    return next((p for p in (record_problem(folder, n, r) for n, r in files.items()) if p), None)


def _ours(folder: Path) -> bool:
    return not folder.is_symlink() and folder.is_dir() and (is_owned(folder, ROLE) or read_stamp(folder) is not None)


def _clear_for(out: Path, stamp: dict | None) -> None:
    """Make way for a new version of `out`: nothing there, an empty folder, or a folder of ours that
    holds only files we wrote (they are replaced when the new one is published)."""
    check_replaceable(out, stamp)
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        out.rmdir()


def check_replaceable(out: Path, stamp: dict | None) -> None:
    """Refuse an output folder mergecli may not replace (see the module docstring)."""
    if not (out.exists() or out.is_symlink()) or out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        return
    if not _ours(out):
        raise MergeCliError(f"output folder {out} exists and was not written by mergecli; it is left untouched",
                            "remove or rename it, or change output_dir or the merge's name")
    listed = set(stamp["files"]) if stamp else set()
    foreign = sorted(p.name for p in out.iterdir() if p.name not in listed | {STAMP, OWNER_MARKER})
    if foreign:
        raise MergeCliError(f"output folder {out} holds files mergecli did not write ({', '.join(foreign[:3])}"
                            f"{', ...' if len(foreign) > 3 else ''}); it is left untouched",
                            "move those files elsewhere, then rerun")


def account_lines(account: dict[str, Any], names: bool = True, shown: int = 4) -> list[str]:
    """What happened to every tensor, in words: merged, copied from the base (and why), fine-tunes'
    buffers not written or lacked (`merging.account_of`)."""
    def listed(items: list[str]) -> str:
        more = f", +{len(items) - shown} more" if len(items) > shown else ""
        return f" ({', '.join(items[:shown])}{more})" if names else ""

    lines = [f"{account.get('merged', 0)} merged"]
    lines += [f"{len(items)} copied from the base: {why}{listed(items)}" for why, items in account.get("copied", {}).items()]
    lines += [f"{len(items)} buffers of {model} skipped (not weights; the base has none){listed(items)}"
              for model, items in account.get("skipped_buffers", {}).items()]
    lines += [f"{model} lacks {len(items)} buffers of the base (copied from the base){listed(items)}"
              for model, items in account.get("lacking_buffers", {}).items()]
    return lines


def card_of(recipe: Recipe, merge: MergeSpec, result: MergeResult) -> str:
    """The README of a merged folder (`card.model_card`): what was merged with which weights, the
    method and its parameters, what was kept, and the recipe."""
    from ..engine.card import model_card, setting_text
    from ..methods.settings import settings_of

    models = recipe.models_of(merge)
    settings = settings_of(merge, models)
    rows = [(m.name, m.model, setting_text(next(w for w in levels if w is not None)))
            for m, levels in zip(models, settings.weights)]
    params = ", ".join(f"{k} {setting_text(v)}" for k, v in merge.params.items())
    summary = [f"Merged with mergecli {__version__}: method `{merge.method}` ({params or 'no parameters'}).", "",
               f"Fraction of task-vector entries kept: {result.kept_density:.4f}. Merge time: {result.seconds:.1f} s.",
               "", "Tensors: " + "; ".join(account_lines(result.account, names=False)) + " (names in `mergecli.json`)."]
    if result.search and result.search.get("mode") == LEARNED:
        from ..quality.learn import card_lines

        summary += ["", *card_lines(result.search)]
    elif result.search:
        trace = ", ".join(f"{float(k):g}: {100 * v:.1f}%" for k, v in result.search["trace"].items())
        summary += ["", f"lambda: auto chose {result.search['chosen']:.4g}: the scale whose merge keeps the most of the "
                        f"fine-tunes' gain ({100 * result.search['score']:.1f}%) on {result.search['windows']} held-out "
                        f"calibration windows of {result.search['seq_len']} tokens per fine-tune "
                        f"({', '.join(result.search['domains'])}). Tried: {trace}."]
    if result.adapter:
        energies = sorted(m["energy_kept"] for m in result.adapter["modules"].values() if m["kind"] != "full")
        if energies:
            summary += ["", f"LoRA rank {merge.rank}: energy of the merged change kept per module "
                            f"{energies[0]:.4f} (lowest) to {energies[-1]:.4f}; per module in `mergecli_lora.json`."]
    return model_card(f"{recipe.name}: {merge.name}", recipe.base, rows, recipe.to_yaml(), "\n".join(summary),
                      adapter=merge.output == "lora", root=recipe.root)


def show(results: list[MergeResult]) -> View:
    rows = [[r.name, r.method, r.params.get("score", "-"), r.params.get("density", "-"), f"{r.kept_density:.4f}",
             f"{r.seconds:.1f}", "reused" if r.reused else "built", r.path] for r in results]
    return View("merges", ["name", "method", "score", "density", "kept", "seconds", "status", "output"], rows,
                [r.as_dict() for r in results])


STAGE = Stage(
    "merge", "Build every merge variant of the recipe as a Hugging Face model folder.",
    run=run, show=show, order=30, plan=lambda ctx: [spec_of(ctx, m) for m in ctx.recipe.merges],
    options=(
        Option("only", list[str], None, "merge only this variant (repeatable)"),
        Option("overwrite", bool, False, "rebuild even when the output folder is current (mergecli's own "
                                         "folders only: others are never replaced)"),
        Option("dtype", str, None, "output dtype of every variant: float32, float16, bfloat16", override="dtype"),
        Option("workers", int, 2, "tensors computed at once (threads); same result for any value", minimum=1),
    ))
