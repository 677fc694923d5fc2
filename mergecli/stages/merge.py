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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.markup import escape

from ..engine.card import account_lines, model_card, setting_text
from ..errors import MergeCliError, RecipeError, UsageError, WorkspaceBusyError
from ..fsutil import OWNER_MARKER, building, file_record, locked, publish
from ..methods.settings import VariantSettings, settings_of
from ..models.reference import ModelSource
from ..quality.choosers import chooser_for
from ..quality.scales import Choice, Chooser, Setting, group_of, part_scales
from ..recipe.datasets import describe_spec, fingerprint
from ..engine.layout import BASE as COPY_BASE, Block, stacked
from ..recipe.schema import BASE, MergeSpec, ModelSpec, Recipe, key_view
from ..store.artifacts import ArtifactSpec
from ..store.outputs import ROLE, STAMP, check_replaceable, current, ours, read_stamp
from ..version import __version__
from . import hessian, taskvec
from .base import Context, Option, Stage, View

if TYPE_CHECKING:
    from ..engine.hessian_set import HessianSet
    from ..engine.taskvectors import TaskVector
    from ..engine.vocabulary import MergedTokenizer
    from ..engine.writer import VariantPlan, Written
    from ..quality.scales import Setting


class MergedModelSpec(ArtifactSpec):
    kind = "merge"
    format = 4
    base: str
    inputs: tuple[dict[str, Any], ...]
    variant: dict[str, Any]
    recipe: dict[str, Any]


class PartsSpec(ArtifactSpec):
    """The merges a scale is chosen over (`lambda: auto`, `learned`): the variant at lambda 1, whole
    or one fine-tune's part at a time (`parts`), as changes from the base (`writer.write_parts`)."""

    kind = "parts"
    format = 2  # 2: what the merge kept of each tensor (`engine.parts.COUNTS`), to write the chosen merge from
    base: str
    inputs: tuple[dict[str, Any], ...]
    variant: dict[str, Any]
    parts: tuple[tuple[float, ...] | None, ...]


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


@dataclass(frozen=True)
class Variant:
    """One merge of the recipe with what it reads resolved once (`variant_of`), so that the steps
    below take plain values instead of asking the recipe the same questions again."""

    spec: MergeSpec
    models: tuple[ModelSpec, ...]  # the fine-tunes it reads, in the order of its task vectors
    out: Path
    where: str  # "merges.<i>", the field an error names
    chooser: Chooser
    blocks: list[Block] | None  # a layer-stacking variant's blocks (`engine.layout`)
    tokenizer_model: ModelSpec | None  # `tokenizer.source`, a model the variant does not merge

    @property
    def name(self) -> str:
        return self.spec.name


def variant_of(recipe: Recipe, merge: MergeSpec) -> Variant:
    """Every answer about `merge` the stage needs more than once, asked of the recipe here only."""
    models = tuple(recipe.models_of(merge))
    where = f"merges.{recipe.merges.index(merge)}"
    source = recipe.tokenizer.source if recipe.tokenizer is not None else None
    outside = source not in (None, "base", "union") and source not in {m.name for m in models}
    return Variant(merge, models, recipe.output_path / merge.name, where, chooser_for(merge.params.get("lambda")),
                   blocks_of(recipe, merge, models, where),
                   next(m for m in recipe.models if m.name == source) if outside else None)


def spec_of(ctx: Context, variant: Variant) -> MergedModelSpec:
    search = variant.chooser.key(*choice_inputs(ctx, variant))
    vocabulary = ctx.source(variant.tokenizer_model.model).fingerprint if variant.tokenizer_model else None
    return MergedModelSpec(base=ctx.base.fingerprint, inputs=_inputs(ctx, variant),
                           variant={**_keyed(key_view(variant.spec)), **({"search": search} if search else {}),
                                    **({"tokenizer_source": vocabulary} if vocabulary else {})},
                           recipe=_keyed(key_view(ctx.recipe, exclude={"models", "merges", "calibration",
                                                                      "evaluation"})))


def _keyed(view: dict[str, Any]) -> dict[str, Any]:
    """A key view, less the fields left unset that came after its key's form (the keys of variants
    that stack no layers, of recipes that set no tokenizer, stay what they were)."""
    return {k: v for k, v in view.items() if not (k in ("layers", "tokenizer") and v is None)}


def _inputs(ctx: Context, variant: Variant) -> tuple[dict[str, Any], ...]:
    """Each merged model's recipe entry with the keys of its task vector and, when the method or
    score uses them, its Hessians."""
    return tuple({"entry": key_view(m, exclude={"dataset"}), "taskvec": taskvec.spec_of(ctx, m).key(),
                  "hessian": hessian.spec_of(ctx, m).key() if variant.spec.needs_stats else None}
                 for m in variant.models)


def choice_inputs(ctx: Context, variant: Variant) -> tuple[Any, dict[str, Any], Any]:
    """What a scale choice may depend on beyond the variant (`Chooser.key`): the merged fine-tunes'
    calibration text, the calibration settings and calibration.general, each fingerprinted only
    when the chooser asks (hashing text files costs time; a fixed lambda reads none)."""
    def datasets() -> list[dict[str, Any]]:
        return [fingerprint(m.dataset, ctx.recipe.root).model_dump(mode="json")
                for m in variant.models if m.dataset is not None]

    def general() -> dict[str, Any] | None:
        spec = ctx.recipe.calibration.general
        if spec is None:
            return None
        try:
            return fingerprint(spec, ctx.recipe.root).model_dump(mode="json")
        except MergeCliError as exc:  # before any scale is chosen, naming the field
            raise MergeCliError(f"calibration.general: {exc.message}", exc.hint) from None

    return datasets, key_view(ctx.recipe.calibration, exclude={"general"}), general


def parts_spec(ctx: Context, variant: Variant) -> PartsSpec | None:
    scales = part_scales(variant.chooser, len(variant.models))
    if not scales:
        return None
    return PartsSpec(base=ctx.base.fingerprint, inputs=_inputs(ctx, variant),
                     variant=_keyed(key_view(variant.spec.with_param("lambda", 1.0))),
                     parts=tuple(None if s is None else tuple(s) for s in scales))


def run(ctx: Context, only: list[str] | None = None, overwrite: bool = False, workers: int = 2) -> list[MergeResult]:
    """Build every merge variant of the recipe (or those named in `only`); cached ones are reused.

    `workers` tensors are computed at once (threads, each with its share of torch's threads); the
    result does not depend on it. `overwrite` rebuilds a variant even when its folder is current.
    A multi-stage recipe runs its stages in order (`only`: the merges named and those they merge)."""
    if ctx.recipe.stages:
        return _run_stages(ctx, only, overwrite, workers)
    return _run_recipe(ctx, only, overwrite, workers)


def _run_stages(ctx: Context, only: list[str] | None, overwrite: bool, workers: int) -> list[MergeResult]:
    """Each stage of a multi-stage recipe in turn, in a context of its own (the final stage in
    `ctx`), an earlier merge it reads known by its key (`_provide`)."""
    recipes = [*ctx.recipe.stages, ctx.recipe]
    wanted = _wanted(recipes, only)
    made: dict[str, tuple[Path, str, str]] = {}
    results: list[MergeResult] = []
    for recipe in recipes:
        names = [m.name for m in recipe.merges if m.name in wanted]
        if not names:
            continue
        stage = ctx if recipe is ctx.recipe else Context(recipe, ctx.reporter, ctx.device, ctx.wait, ctx.dist)
        _provide(stage, made)
        ctx.reporter.log(f"stage [bold]{', '.join(names)}[/]")
        built = _run_recipe(stage, names, overwrite, workers)
        made.update((r.name, (r.path, r.key, r.output)) for r in built)
        results += built
    return results


def _wanted(recipes: list[Recipe], only: list[str] | None) -> set[str]:
    """The merges a multi-stage run builds: those named (all without `only`) and, stage by stage,
    every merge a stage it builds reads."""
    owner = {m.name: recipe for recipe in recipes for m in recipe.merges}
    if not only:
        return set(owner)
    for name in only:
        if name not in owner:
            raise RecipeError(f"no merge named {name!r} in the stages", f"choose one of: {', '.join(owner)}")
    wanted, todo = set(), list(only)
    while todo:
        name = todo.pop()
        if name not in wanted:
            wanted.add(name)
            todo += owner[name].produced.values()
    return wanted


def _provide(ctx: Context, made: dict[str, tuple[Path, str, str]]) -> None:
    """A stage's references to earlier merges as their folders, fingerprinted by those merges' keys:
    its own key changes exactly when one of theirs does (and a plan needs no folder built)."""
    for ref, name in ctx.recipe.produced.items():
        path, key, output = made[name]
        ctx.provide(ref, ModelSource(ref, path, "lora" if output == "lora" else "full", f"merged:{key}"))


def _run_recipe(ctx: Context, only: list[str] | None, overwrite: bool, workers: int) -> list[MergeResult]:
    recipe = ctx.recipe
    if workers < 1:
        raise UsageError(f"workers must be at least 1, got {workers}")
    if not recipe.merges:
        raise MergeCliError("the recipe has no merges", "add a 'merges:' list (see `mergecli recipes ls`)")
    merges = [recipe.merge(name) for name in dict.fromkeys(only)] if only else recipe.merges
    variants = [variant_of(recipe, merge) for merge in merges]
    ctx.torch_device  # fail on a bad --device before any work
    for variant in variants:
        ctx.guard(variant.out, "output folder")
        check_replaceable(variant.out, read_stamp(variant.out))
    check_settings(ctx, variants)
    vectors = {c.vector.model: c.vector for c in ctx.need(taskvec.STAGE)}
    needed = {m.name: m for v in variants if v.spec.needs_stats for m in v.models}
    hessians = {h.model: h for h in hessian.hessian_sets(ctx, list(needed.values()))}
    return [merge_variant(ctx, v, [vectors[m.name] for m in v.models],
                          [hessians[m.name] for m in v.models] if v.spec.needs_stats else None, overwrite, workers)
            for v in variants]


def check_settings(ctx: Context, variants: list[Variant]) -> None:
    """A variant whose parameters or weights vary per tensor is checked on every tensor of the base
    before any work (the recipe could only check one-value settings)."""
    from ..models.safetensors_io import Checkpoint  # start-up time (torch)

    for variant in variants:
        if variant.blocks is not None:
            _check_blocks(ctx, variant.blocks)
            continue
        settings = settings_of(variant.spec, variant.models)
        if settings.constant():
            continue
        with Checkpoint.open(ctx.base.path) as ckpt:
            names = sorted({ctx.arch.canonical(n) for n in ckpt.names()})
        try:
            settings.check_tensors(names, ctx.arch.layer_of, ctx.arch.num_layers)
        except ValueError as exc:
            raise RecipeError(f"{variant.where}.{exc}") from None


def _check_blocks(ctx: Context, blocks: list[Block]) -> None:
    """A layer-stacking variant before any work: its ranges within the base's layers, and each
    block whose settings vary per tensor checked on every tensor it merges."""
    from ..models.safetensors_io import Checkpoint  # start-up time (torch)

    with Checkpoint.open(ctx.base.path) as ckpt:
        names = ckpt.names()
    try:
        layout = stacked(ctx.arch, names, blocks)
    except ValueError as exc:
        raise RecipeError(str(exc)) from None
    for block, output in layout.merged():
        if block.settings.constant():
            continue
        try:
            block.settings.check(layout.resolve(output))
        except ValueError as exc:
            raise RecipeError(f"{block.label}.{exc} (for tensor {output.name})") from None


def blocks_of(recipe: Recipe, merge: MergeSpec, models: tuple[ModelSpec, ...], where: str) -> list[Block] | None:
    """A layer-stacking variant's blocks as the writer takes them (`engine.layout.Block`); None for
    a variant that merges the base's tensors. `models`: the variant's fine-tunes, in the order of
    its task vectors."""
    if merge.layers is None:
        return None
    position = {m.name: i for i, m in enumerate(models)}
    where = f"{where}.layers"
    specs = iter(merge.merge_blocks)
    blocks = []
    for i, layer in enumerate(merge.layers):
        start, end = layer.range or (None, None)
        if layer.source is not None:
            source = COPY_BASE if layer.source == BASE else position[layer.source]
            blocks.append(Block(start, end, source=source, scale=layer.params.get("scale"), label=f"{where}.{i}"))
            continue
        spec = next(specs)
        merged = recipe.models_of(spec)
        ranges = merge.block_ranges(i)
        blocks.append(Block(start, end, settings_of(spec, merged), tuple(position[m.name] for m in merged),
                            tuple(ranges[m.name][0] if m.name in ranges else None for m in merged),
                            label=f"{where}.{i}"))
    return blocks


def merge_variant(ctx: Context, variant: Variant, vectors: list, hessians: list["HessianSet"] | None,
                  overwrite: bool, workers: int) -> MergeResult:
    spec = spec_of(ctx, variant)
    key, out = spec.key(), variant.out
    try:  # under torchrun rank 0 holds the lock and decides; every rank writes its part
        with ctx.dist.lead(lambda: locked(out.parent / f".{variant.name}.lock", ctx.wait,
                           lambda: ctx.reporter.log(f"another run is writing {out}; waiting for it to finish"))):
            reused = ctx.dist.decide(lambda: _reusable(ctx, variant.name, out, key, overwrite))
            if reused:
                return reused
            result = _build(ctx, variant, vectors, hessians, workers, key)
    except BlockingIOError:
        raise WorkspaceBusyError(f"another run is writing {out}", "wait for it, or rerun with --wait") from None
    ctx.reporter.log(f"merge [bold]{variant.name}[/]: wrote {out} in {result.seconds:.1f} s")
    return result


def _reusable(ctx: Context, name: str, out: Path, key: str, overwrite: bool) -> MergeResult | None:
    """The folder's result if it is current and intact; else None, the way cleared
    (`store.outputs.current`). Call under the folder's lock."""
    found, problem = current(out, key, overwrite)
    if found is not None:
        ctx.reporter.log(f"merge [bold]{name}[/]: reused {out}")
        return MergeResult(**{**found, "path": out, "reused": True})
    if problem:
        ctx.reporter.log(f"[yellow]merge {name}: {out} is damaged ({problem}); rebuilding[/]")
    return None


def _build(ctx: Context, variant: Variant, vectors: list["TaskVector"], hessians: list["HessianSet"] | None,
           workers: int, key: str) -> MergeResult:
    """Choose the scale (if the recipe asks), write the variant into a temporary folder, stamp it
    and rename it into place (rank 0; under torchrun every rank writes its share of the tensors)."""
    choice, parts = _choose(ctx, variant, vectors, hessians, workers)
    plan = _plan(ctx, variant, vectors, hessians, choice, parts)
    result = None
    with ctx.dist.lead(lambda: building(variant.out, ROLE)) as tmp:  # made by rank 0
        written, adapter = _write(ctx, variant, plan, tmp, workers)
        if ctx.dist.main:  # every rank's shards are complete: the writer gathered from them
            result = _finish(ctx, variant, plan.settings, choice, written, adapter, key, tmp)
    return ctx.dist.decide(lambda: result)  # rank 0's (its wall time) on every rank


def _plan(ctx: Context, variant: Variant, vectors: list["TaskVector"], hessians: list["HessianSet"] | None,
          choice: Choice = Choice(), parts: Path | None = None) -> "VariantPlan":
    """Everything the variant's tensors are computed from, at the chosen scale: merged from the
    task vectors (and statistics), or, given the `parts` the choice was scored on, from those."""
    import torch  # start-up time: the CLI builds --help from the stages without torch

    from ..engine.hessians import HessianReader  # start-up time (torch)
    from ..engine.parts import StoredParts  # start-up time (torch)
    from ..engine.writer import VariantPlan

    merge, arch = variant.spec, ctx.arch
    built = merge if choice.lam is None else merge.with_param("lambda", choice.lam)
    scales = None
    if choice.scales is not None:
        found = choice.scales

        def scales(canonical: str):
            return found.get(group_of(arch, arch.module_of(canonical)))
    from_parts = None
    if parts is not None:
        count = len(part_scales(variant.chooser, len(variant.models)))
        lam = 1.0 if choice.lam is None else choice.lam

        def factors(canonical: str) -> list[float]:
            given = scales(canonical) if scales else None
            return [lam] * count if given is None else [lam * s for s in given]
        from_parts = StoredParts.read(parts, count, factors, arch.canonical)
    dtype = getattr(torch, merge.dtype) if merge.dtype else None
    return VariantPlan(
        settings=settings_of(built, variant.models), vectors=vectors,
        readers=[HessianReader(h.artifact.path, merge.params.get("damp", 0.01), ctx.torch_device) for h in hessians]
        if hessians and from_parts is None else None, from_parts=from_parts,
        dtype=torch.float32 if merge.output == "lora" else dtype, clamp=merge.overflow == "clamp",
        extra_tokens=ctx.recipe.extra_tokens, shard_bytes=ctx.recipe.shard_bytes, scales=scales,
        blocks=variant.blocks, names=[m.name for m in variant.models], tokenizer=_tokenizer(ctx, variant))


def _tokenizer(ctx: Context, variant: Variant) -> "MergedTokenizer | None":
    """The tokenizer the variant writes when the recipe sets one (`engine.vocabulary`): read from
    the base and the variant's models (a LoRA's, and a model's without tokenizer files, is the
    base's), or, where the vocabulary is one model's, from it."""
    spec = ctx.recipe.tokenizer
    if spec is None:
        return None
    from ..engine.vocabulary import Input, merged_tokenizer  # start-up time (torch, transformers)

    base = Input(BASE, ctx.base.path, _config_rows(ctx.base.path))
    inputs = []
    for model in [*variant.models, *([variant.tokenizer_model] if variant.tokenizer_model else [])]:
        source = ctx.source(model.model)
        if source.kind == "lora":
            inputs.append(Input(model.name, ctx.base.path, base.rows))
        else:
            has = any((source.path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
            inputs.append(Input(model.name, source.path if has else None, _config_rows(source.path)))
    return merged_tokenizer(spec, base, inputs)


def _config_rows(folder: Path) -> int | None:
    """A model's embedding rows as its config.json says (`vocab_size`, in `text_config` if nested)."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    config = config.get("text_config", config) if isinstance(config.get("text_config"), dict) else config
    return config.get("vocab_size") if isinstance(config.get("vocab_size"), int) else None


def _choose(ctx: Context, variant: Variant, vectors: list["TaskVector"], hessians: list["HessianSet"] | None,
            workers: int) -> tuple[Choice, Path | None]:
    """The chooser's choice, scored on the merges it asks for (stored once in the workspace as
    parts: every process of a torchrun job scores its share of the windows), and those parts' folder."""
    spec = parts_spec(ctx, variant)
    if spec is None:
        return Choice(), None
    from ..engine.parts import part_folders  # start-up time (torch)
    from ..engine.writer import write_parts
    from ..models.safetensors_io import Checkpoint

    plan = _plan(ctx, variant, vectors, hessians, Choice(lam=1.0))
    label = f"parts {variant.name}"
    artifact, _ = ctx.get_or_build(spec, label, lambda folder: write_parts(
        folder, plan, ctx.base.path, ctx.arch, [None if s is None else list(s) for s in spec.parts], ctx.torch_device,
        workers, ctx.reporter, label))
    setting = _setting(ctx, variant)
    parts = [setting.runner.checkpoint_weights(Checkpoint.open(folder), partial=True,
                                               only=json.loads((folder / "changed.json").read_text()))
             for folder in part_folders(artifact.path, len(spec.parts))]
    choice = variant.chooser.choose(setting, parts)
    ctx.reporter.log(f"merge [bold]{variant.name}[/]: {escape(variant.chooser.log_line(choice.record or {}))}")
    return choice, artifact.path


def _setting(ctx: Context, variant: Variant) -> "Setting":
    """What a chooser reads, resolved once: the base's architecture run block by block, the base's
    weights, each merged fine-tune with its calibration text (a LoRA: the base plus its adapter's
    change), calibration.general's text."""
    from ..engine.streamed import StreamedModel, source_weights  # start-up time (torch)
    from ..models.safetensors_io import Checkpoint
    from ..quality.scoring import Domain

    cal = ctx.recipe.calibration
    runner = StreamedModel.from_folder(ctx.base.path, device=ctx.torch_device)
    base = runner.checkpoint_weights(Checkpoint.open(ctx.base.path))
    domains = []
    for model in variant.models:
        if model.dataset is not None:
            domains.append(Domain(model.name, source_weights(runner, ctx.source(model.model), ctx.base.path, ctx.arch),
                                  ctx.texts(model.dataset),
                                  f"calibration part of dataset {describe_spec(model.dataset)} ({model.name})"))
    general = None if cal.general is None else (ctx.texts(cal.general), describe_spec(cal.general))
    arch = ctx.arch
    return Setting(variant.name, [m.name for m in variant.models], runner, base, domains, general, ctx.base,
                   ctx.tokenizer, cal, ctx.torch_device, lambda name: group_of(arch, name), ctx.reporter, ctx.dist)


def _write(ctx: Context, variant: Variant, plan: "VariantPlan", tmp: Path, workers: int
           ) -> tuple["Written | None", dict[str, Any] | None]:
    """The variant's files: a model (every rank writes the shards of its share of the tensors) or
    an adapter (factored by rank 0 alone; the others wait for it)."""
    from ..engine.lora_out import write_merged_adapter  # start-up time (torch)
    from ..engine.writer import write_variant

    label, merge = f"merge {variant.name}", variant.spec
    if merge.output != "lora":
        return write_variant(tmp, plan, ctx.base.path, ctx.arch, [ctx.source(m.model).path for m in variant.models],
                             ctx.torch_device, workers, ctx.reporter, label, ctx.dist), None
    if not ctx.dist.main:
        return None, None
    import torch

    written, modules = write_merged_adapter(tmp, plan, ctx.base.path, ctx.recipe.resolve(ctx.recipe.base), ctx.arch,
                                            ctx.torch_device, workers, ctx.reporter, label, merge.rank,
                                            getattr(torch, merge.dtype) if merge.dtype else torch.float32)
    for module, r in modules.items():
        ctx.reporter.log(f"merge [bold]{variant.name}[/]: {module}: {r.kind}" + (
            f" rank {r.rank}, energy kept {r.energy_kept:.4f}" if r.kind != "full" else " (saved whole)"))
    return written, {"rank": merge.rank, "modules": {m: asdict(r) for m, r in modules.items()}}


def _finish(ctx: Context, variant: Variant, settings: VariantSettings, choice: Choice, written: "Written",
            adapter: dict[str, Any] | None, key: str, tmp: Path) -> MergeResult:
    """The result, said in the log; the recipe, the card and the stamp written beside the weights;
    the folder renamed into place."""
    merge = variant.spec
    for line in account_lines(written.account):
        ctx.reporter.log(f"merge [bold]{merge.name}[/]: {escape(line)}")
    if written.without_stats:
        ctx.reporter.log(f"merge [bold]{merge.name}[/]: {written.without_stats} tensors have no calibration statistics "
                         "(no linear layer the hooks saw reads them: embeddings, norms, biases, the output layer, "
                         "fused MoE experts) and used "
                         + ("a weighted mean" if merge.method_spec.needs_stats else "magnitude scores"))
    seconds = written.seconds + (choice.record["seconds"] if choice.record else 0.0)
    result = MergeResult(merge.name, merge.method, merge.params, variant.out, False, seconds, written.kept_density,
                         written.tensors, key, [m.name for m in variant.models], merge.output,
                         adapter, choice.record, written.account)
    (tmp / "mergecli_recipe.yaml").write_text(ctx.recipe.to_yaml())
    (tmp / "README.md").write_text(card_of(ctx.recipe, variant, settings, result))
    files = {p.name: file_record(p) for p in sorted(tmp.iterdir()) if p.is_file() and p.name != OWNER_MARKER}
    (tmp / STAMP).write_text(json.dumps({"mergecli": __version__, "kind": f"merged-{merge.output}", "key": key,
                                         "files": files, "result": result.as_dict()}, indent=1))
    publish(tmp, variant.out, owned=ours)
    return result


def card_of(recipe: Recipe, variant: Variant, settings: VariantSettings, result: MergeResult) -> str:
    """The README of a merged folder (`card.model_card`): what was merged with which weights (as
    the merge resolved them: `settings`), the method and its parameters, what was kept, how the
    scale was chosen, and the recipe."""
    merge, models = variant.spec, variant.models
    rows = [(m.name, m.model, setting_text(next(w for w in levels if w is not None)))
            for m, levels in zip(models, settings.weights)]
    params = ", ".join(f"{k} {setting_text(v)}" for k, v in merge.params.items())
    summary = [f"Merged with mergecli {__version__}: method `{merge.method}` ({params or 'no parameters'}).", "",
               f"Fraction of task-vector entries kept: {result.kept_density:.4f}. Merge time: {result.seconds:.1f} s.",
               "", "Tensors: " + "; ".join(account_lines(result.account, names=False)) + " (names in `mergecli.json`)."]
    if result.search:
        summary += ["", *variant.chooser.card_lines(result.search)]
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


def plan(ctx: Context) -> list[ArtifactSpec]:
    """Every merged folder's spec, and the parts its scale is chosen over. A multi-stage recipe's
    stages too, an earlier merge known by its key, built or not; and their task vectors and
    Hessians, which the other stages' plans see of the final stage only, with an earlier merge's
    folder as a file, not as that merge."""
    specs: list[ArtifactSpec] = []
    made: dict[str, tuple[Path, str, str]] = {}
    for recipe in [*ctx.recipe.stages, ctx.recipe]:
        stage = ctx if recipe is ctx.recipe else Context(recipe, ctx.reporter, ctx.device, ctx.wait, ctx.dist)
        _provide(stage, made)
        if ctx.recipe.stages:
            specs += [*taskvec.STAGE.plan(stage), *hessian.STAGE.plan(stage)]
        for merge in recipe.merges:
            variant = variant_of(recipe, merge)
            parts = parts_spec(stage, variant)
            spec = spec_of(stage, variant)
            made[merge.name] = (recipe.output_path / merge.name, spec.key(), merge.output)
            specs += [spec, *([parts] if parts else [])]
    return specs


STAGE = Stage(
    "merge", "Build every merge variant of the recipe as a Hugging Face model folder.",
    run=run, show=show, order=30, plan=lambda ctx: plan(ctx),
    options=(
        Option("only", list[str], None, "merge only this variant (repeatable)"),
        Option("overwrite", bool, False, "rebuild even when the output folder is current (mergecli's own "
                                         "folders only: others are never replaced)"),
        Option("dtype", str, None, "output dtype of every variant: float32, float16, bfloat16", override="dtype"),
        Option("workers", int, 2, "tensors computed at once (threads); same result for any value", minimum=1),
    ))
