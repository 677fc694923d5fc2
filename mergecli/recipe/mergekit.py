"""mergekit configs as mergecli recipes: `mergecli merge config.yml` and `mergecli recipes import`.

A mergekit config (a YAML mapping with `merge_method:`) becomes one mergecli recipe with one
merge variant, meaning what mergekit 0.1.5 computes with it: its per-method defaults are written
out explicitly (mergekit's `density` defaults to 1.0, i.e. no trimming, where mergecli's is 0.2;
`normalize` and `rescale` differ per method), parameters are carried as the same scalars,
gradients and filter lists (`mergecli.schedule` resolves them exactly as mergekit), and its
levels of precedence (slice source, slice, top level) are flattened with `schedule.chain` into
one value per model that resolves identically for every tensor.

What mergecli cannot honour is a `RecipeError` naming the key: methods it lacks, layer stacking
with `slices`, `modules`, vocabulary unions, chat templates, keys mergekit itself would ignore
(a misspelt parameter, a global parameter given per model). Keys that change nothing in mergekit's
result (`int8_mask`, a `density` given to task arithmetic) are dropped with a note; the notes are
returned with the recipe so the command can print them.

Pure translation: the only file it reads is a model's config.json, through the `layers_of`
callback, to check that `slices` cover whole models.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from ..methods import schedule
from ..errors import RecipeError
from ..models.reference import is_local_reference
from .schema import chat_template_text, default_model_name
from .yaml_io import read_yaml_file

REQUIRED = object()
"""A parameter mergekit refuses to run without."""


@dataclass(frozen=True)
class MethodMap:
    """One mergekit method: its parameters (with mergekit's defaults) and the mergecli variant."""

    mergecli: str
    shared: Mapping[str, Any]
    per_model: Mapping[str, Any]
    base: str  # see BASE_MODES
    fixed: Mapping[str, Any] = field(default_factory=dict)
    inert: frozenset[str] = frozenset()  # declared by mergekit for this method, no effect on values
    min_models: int = 1  # mergekit's inputs besides the base ("points": all its inputs, the base included)
    max_models: int | None = None


BASE_MODES = {
    "required": "task vectors against base_model (mergekit refuses to run without one)",
    "endpoint": "slerp: base_model is the end at t = 0",
    "optional": "linear: with a base_model it is averaged in with its own weight (base_weight); without, the first "
                "model is the recipe's base and its weight base_weight",
    "origin": "nuslerp, multislerp: with a base_model, task vectors against it (origin: base); without, the weights "
              "themselves, the first model being the recipe's base with its weight as base_weight (origin: zero)",
    "points": "karcher: every input is a point with equal weight, base_model too (appended when not listed); the "
              "first input is the recipe's base (origin: zero)",
}
"""How a mergekit method uses `base_model`, and how mergecli's recipe base is chosen for it."""


def _gta(mergecli: str, score: str | None, normalize: bool, rescale: bool, extra: Mapping[str, Any] | None = None,
         topk: bool = True) -> MethodMap:
    """mergekit's GeneralizedTaskArithmeticMerge: shared int8_mask, normalize, rescale, lambda;
    per model weight (required), density (default 1.0) and the method's extra parameter."""
    fixed: dict[str, Any] = {}
    inert = {"int8_mask"}
    if score is None:  # task arithmetic: declares density and rescale but never trims
        inert |= {"density", "rescale"}
    else:
        fixed["score"] = score
        if topk:
            fixed["topk"] = "tensor"
    return MethodMap(mergecli, {"int8_mask": False, "normalize": normalize, "rescale": rescale, "lambda": 1.0},
                     {"weight": REQUIRED, "density": 1.0, **(extra or {})}, "required", fixed, frozenset(inert))


METHODS: dict[str, MethodMap] = {
    "task_arithmetic": _gta("task_arithmetic", None, normalize=False, rescale=False),
    "ties": _gta("ties", "magnitude", normalize=True, rescale=False),
    "dare_ties": _gta("dare_ties", "random", normalize=False, rescale=True),
    "dare_linear": _gta("dare_linear", "random", normalize=False, rescale=True),
    "breadcrumbs": _gta("breadcrumbs", "magnitude", normalize=False, rescale=False, extra={"gamma": 0.01},
                        topk=False),
    "breadcrumbs_ties": _gta("breadcrumbs_ties", "magnitude", normalize=False, rescale=False, extra={"gamma": 0.01},
                             topk=False),
    "della": _gta("della", "magnitude", normalize=True, rescale=True, extra={"epsilon": 0.15}, topk=False),
    "della_linear": _gta("della_linear", "magnitude", normalize=False, rescale=True, extra={"epsilon": 0.15},
                         topk=False),
    "linear": MethodMap("linear", {"normalize": True}, {"weight": REQUIRED}, "optional"),
    "slerp": MethodMap("slerp", {"t": REQUIRED}, {}, "endpoint", min_models=1, max_models=1),
    "model_stock": MethodMap("model_stock", {"filter_wise": False}, {}, "required", min_models=2),
    # merge_methods/nuslerp.py: PerNonBase weight, base optional, exactly 2 non-base inputs
    "nuslerp": MethodMap("nuslerp", {"nuslerp_flatten": True, "nuslerp_row_wise": False}, {"weight": REQUIRED},
                         "origin", min_models=2, max_models=2),
    # multislerp.py: PerNonBase weight, base optional, at least 1 non-base input
    "multislerp": MethodMap("multislerp", {"normalize_weights": True, "eps": 1e-8}, {"weight": REQUIRED}, "origin"),
    # karcher.py: base ignored (it is one more input), no weights, equal alphas over every input
    "karcher": MethodMap("karcher", {"max_iter": 10, "tol": 1e-5}, {}, "points", {"origin": "zero"}, min_models=2),
    # sce.py: base required, int8_mask only sets the masks' dtype
    "sce": MethodMap("sce", {"int8_mask": False, "select_topk": 1.0}, {}, "required", inert=frozenset({"int8_mask"})),
    # nearswap.py: base required, exactly 2 inputs; t has no default
    "nearswap": MethodMap("nearswap", {"t": REQUIRED}, {}, "required", min_models=1, max_models=1),
    # arcee_fusion.py: base required, exactly 2 inputs
    "arcee_fusion": MethodMap("arcee_fusion", {}, {}, "required", min_models=1, max_models=1),
    # ram.py: base required
    "ram": MethodMap("ram", {"epsilon": 1e-5}, {}, "required"),
    "ramplus_tl": MethodMap("ramplus_tl", {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5}, {}, "required"),
}
"""mergekit 0.1.5 methods mergecli runs, keyed by mergekit's name (`merge_methods/registry.py`)."""

BOOLEAN = {"int8_mask", "normalize", "rescale", "filter_wise", "nuslerp_flatten", "nuslerp_row_wise",
           "normalize_weights"}
TOP_LEVEL = {"merge_method", "base_model", "models", "slices", "modules", "parameters", "dtype", "out_dtype",
             "tokenizer_source", "tokenizer", "chat_template", "name"}
DTYPES = {"float32", "float16", "bfloat16"}


@dataclass
class Translation:
    """The recipe (a dict for `validate_recipe`) and what was dropped or approximated, and why."""

    recipe: dict[str, Any]
    notes: list[str]


def is_mergekit_config(data: Any) -> bool:
    """A mergekit config names its `merge_method`; a mergecli recipe has `merges` instead."""
    return isinstance(data, Mapping) and "merge_method" in data


def translate(data: Mapping[str, Any], root: Path = Path("."), dest: Path | None = None,
              layers_of: Callable[[str], int | None] | None = None, label: str | None = None) -> Translation:
    """The mergecli recipe equivalent to the mergekit config `data`.

    `root`: the folder the config's relative paths are read from; `dest`: the folder the recipe
    will live in (relative local paths are rewritten for it; default `root`). `layers_of(ref)`:
    the number of decoder layers of a model (default: read its config.json), used only to check
    `slices`. `label`: the merge's name when the config gives none (the config file's name, so
    configs side by side write side-by-side folders; default: the method's name).

    mergekit configs name no cache and no output folder (mergekit-yaml takes the output on its
    command line): the recipe gets mergecli's defaults, `workspace` and `merged/<name>` next to
    the recipe, and a note says so.
    """
    notes: list[str] = []
    if not isinstance(data, Mapping):
        raise RecipeError("a mergekit config is a YAML mapping with merge_method, models or slices, ...")
    for key in data:
        if key not in TOP_LEVEL:
            raise RecipeError(f"{key}: not a mergekit config key (mergekit would ignore it)",
                              f"mergekit keys: {', '.join(sorted(TOP_LEVEL))}")
    name = data["merge_method"]
    if name not in METHODS and name != "passthrough":
        raise RecipeError(f"merge_method: {name!r} is not supported by mergecli",
                          f"supported mergekit methods: {', '.join([*METHODS, 'passthrough'])}")
    method = METHODS.get(name)
    _refuse(data, "modules", "mergecli merges one model stack; per-module configs (multimodal) are not supported")
    dtype = _dtype(data, notes)
    slices, models_form = _slices(data)
    merge_name = str(data.get("name") or label or name)
    layers_of = layers_of or (lambda ref: read_num_layers(ref, root))
    used_names: set[str] = set()
    if name == "passthrough":
        base_ref, recipe_models, variant = _passthrough(data, slices, models_form, merge_name, root, dest, used_names,
                                                        notes)
    elif models_form or (len(slices) == 1 and _covers_whole_models(slices[0], layers_of)):
        base_ref, recipe_models, variant = _whole(name, method, data, slices[0], merge_name, root, dest, used_names,
                                                  notes)
    else:
        base_ref, recipe_models, variant = _stacked(name, method, data, slices, merge_name, root, dest, used_names,
                                                    notes)
    if dtype:
        variant["dtype"] = dtype

    recipe: dict[str, Any] = {"name": str(data.get("name") or f"mergekit-{name}"),
                              "base": _rebase(base_ref, root, dest), "models": recipe_models, "merges": [variant],
                              "workspace": "workspace", "output_dir": "merged"}
    tokenizer = _tokenizer(data, base_ref, recipe_models, root, dest, notes)
    if tokenizer:
        recipe["tokenizer"] = tokenizer
    notes.append(f"workspace, output_dir: not in mergekit configs; the cache goes to workspace/ and the merge to "
                 f"merged/{merge_name}/ next to the recipe (override with workspace=DIR output_dir=DIR)")
    return Translation(recipe, notes)


def _whole(name: str, method: MethodMap, data: Mapping[str, Any], one: "Slice", merge_name: str, root: Path,
           dest: Path | None, used_names: set[str], notes: list[str]) -> tuple[str, list[dict], dict[str, Any]]:
    """`models:` (or one output slice whose sources cover whole models): one variant merging the
    base's tensors."""
    base_ref, base_levels, models = _split_base(name, method, data.get("base_model"), one, notes)
    with_base = data.get("base_model") is not None
    _count_inputs(name, method, len(models), with_base, one.where)
    variant: dict[str, Any] = {"name": merge_name, "method": method.mergecli, **method.fixed}
    _shared(variant, name, method, one, with_base, base_levels, notes)
    recipe_models, entries = _model_entries(name, method, models, base_ref, root, dest, used_names, notes)
    variant["models"] = entries if method.per_model else [m["name"] for m in recipe_models]
    return base_ref, recipe_models, variant


def _stacked(name: str, method: MethodMap, data: Mapping[str, Any], slices: list["Slice"], merge_name: str, root: Path,
             dest: Path | None, used_names: set[str], notes: list[str]) -> tuple[str, list[dict], dict[str, Any]]:
    """Output slices stacked (several, or partial layer ranges) with a merge method: a variant with
    one merge block per slice (`layers:`), each over its sources' layer ranges, the base's range
    being the block's. mergecli's recipe has one base: it must play the base's part in every slice
    (base_model, or, for methods that take none, each slice's first source)."""
    base_ref = None
    recipe_models: list[dict] = []
    named: dict[str, str] = {}
    blocks = []
    for index, one in enumerate(slices):
        with_base = data.get("base_model") is not None and any(ref == data["base_model"] for ref, _, _ in one.sources)
        ref, base_levels, models = _split_base(name, method, data.get("base_model"), one, notes)
        if base_ref is not None and ref != base_ref:
            raise RecipeError(f"{one.where}.sources: {ref!r} plays the base's part in this slice and {base_ref!r} in "
                              "the first; mergecli stacks the layers of one base (per-slice bases are not supported)")
        base_ref = ref
        _count_inputs(name, method, len(models), with_base, one.where)
        base_range = one.range_of(ref) if any(r == ref for r, _, _ in one.sources) else one.ranges[0]
        block: dict[str, Any] = {"range": list(base_range)}
        _shared(block, name, method, one, with_base, base_levels, notes)
        for r, _, where in models:
            if r not in named:
                model = _lora_or_model(r, base_ref, where)
                named[r] = _unique(default_model_name(model), used_names)
                recipe_models.append({"name": named[r], "model": _rebase(model, root, dest)})
        _, entries = _model_entries(name, method, models, base_ref, root, dest, set(), notes, named)
        for entry, (r, _, _) in zip(entries, models):
            if one.range_of(r) != base_range:
                entry["range"] = list(one.range_of(r))
        block["models"] = entries
        blocks.append(block)
    variant = {"name": merge_name, "method": method.mergecli, **method.fixed, "layers": blocks}
    notes.append(f"slices: {len(slices)} output slice(s) stacked: each a block of merges.0.layers, its parameters "
                 "flattened (source, slice, top level) as mergekit reads them")
    return base_ref, recipe_models, variant


def _passthrough(data: Mapping[str, Any], slices: list["Slice"], models_form: bool, merge_name: str, root: Path,
                 dest: Path | None, used_names: set[str], notes: list[str]) -> tuple[str, list[dict], dict[str, Any]]:
    """mergekit's passthrough: each output slice the layers of its one source, as stored (times
    `scale`): a variant of copied blocks (`layers: [{from: ...}]`). The recipe's base (the config and
    tokenizer donor, as mergekit's) is base_model, else the first slice's source."""
    refs = []
    for one in slices:
        if len(one.sources) != 1:
            what = "models" if models_form else f"{one.where}.sources"
            raise RecipeError(f"{what}: mergekit's passthrough copies exactly one model per output slice, got "
                              f"{len(one.sources)}")
        ref, levels, where = one.sources[0]
        for key, value in levels[0].items():
            _check_value(key, value, f"{where}.parameters.{key}", "passthrough", {"scale"})
        for level, level_where in zip(one.levels, one.level_names):
            for key, value in level.items():
                _check_value(key, value, f"{level_where}.{key}", "passthrough", {"scale"})
        refs.append(ref)
    base = data.get("base_model")
    if models_form and base is not None and base != refs[0]:
        raise RecipeError("models: mergekit's passthrough takes one input and adds base_model as another; give the "
                          "one model only (or slices:)")
    base_ref = _strip_lora_base(base if isinstance(base, str) else refs[0], "base_model" if base else
                                f"{slices[0].where or 'models.0'}.model")
    named: dict[str, str] = {}
    recipe_models = []
    for ref, (_, _, where) in zip(refs, (one.sources[0] for one in slices)):
        if ref == base_ref or ref in named:
            continue
        model = _lora_or_model(ref, base_ref, where)
        named[ref] = _unique(default_model_name(model), used_names)
        recipe_models.append({"name": named[ref], "model": _rebase(model, root, dest)})
    blocks = []
    for one, ref in zip(slices, refs):
        block: dict[str, Any] = {"from": "base" if ref == base_ref else named[ref]}
        if one.ranges[0] is not None:
            block["range"] = list(one.ranges[0])
        scale = schedule.chain(*(level.get("scale") for level in one.sources[0][1]))
        if scale is not None:
            block["scale"] = _numeric(scale)
        blocks.append(block)
    if any(one.base is not None for one in slices):
        notes.append("slices.*.base_model: dropped: passthrough uses no base")
    return base_ref, recipe_models, {"name": merge_name, "method": "passthrough", "layers": blocks}


def _shared(target: dict[str, Any], name: str, method: MethodMap, one: "Slice", with_base: bool,
            base_levels: list[Mapping[str, Any]], notes: list[str]) -> None:
    """The method's shared parameters (mergekit's defaults written out) into a variant or block."""
    for key, default in method.shared.items():
        setting = schedule.chain(*(level.get(key) for level in one.levels))
        where = next((f"{w}.{key}" for level, w in zip(one.levels, one.level_names) if key in level),
                     f"parameters.{key}")
        if setting is None and default is REQUIRED:
            raise RecipeError(f"parameters.{key}: required by mergekit's {name}")
        _emit(target, key, default if setting is None else setting, where, name, method, notes, setting is not None)
    if method.base == "origin":
        target["origin"] = "base" if with_base else "zero"
    if method.base == "optional" or (method.base == "origin" and not with_base):
        weight = schedule.chain(*(level.get("weight") for level in base_levels))
        if weight is None:
            if method.base == "optional" and one.where and not with_base:
                weight = 0.0  # a slice's sources without base_model: the base takes no part in the average
            else:
                raise RecipeError("parameters.weight: mergekit's linear averages the base_model in too and needs "
                                  "its weight")
        schedule.check(weight, "parameters.weight")
        target["base_weight"] = _numeric(weight)


def _model_entries(name: str, method: MethodMap, models: list[Source], base_ref: str, root: Path, dest: Path | None,
                   used_names: set[str], notes: list[str], named: Mapping[str, str] | None = None
                   ) -> tuple[list[dict], list[dict]]:
    """The recipe's model entries for `models` (named afresh unless `named` names them) and the
    variant's entries, with each model's parameters flattened."""
    recipe_models, entries = [], []
    for ref, levels, where in models:
        model = _lora_or_model(ref, base_ref, where)
        model_name = named[ref] if named else _unique(default_model_name(model), used_names)
        recipe_models.append({"name": model_name, "model": _rebase(model, root, dest)})
        entry: dict[str, Any] = {"name": model_name}
        for key, default in method.per_model.items():
            setting = schedule.chain(*(level.get(key) for level in levels))
            if setting is None and default is REQUIRED:
                raise RecipeError(f"{where}.parameters.{key}: required by mergekit's {name} (it has no default)")
            _emit(entry, key, default if setting is None else setting, f"{where}.parameters.{key}", name, method, notes,
                  setting is not None)
        entries.append(entry)
    return recipe_models, entries


# -- parts -------------------------------------------------------------------------------------
def _refuse(data: Mapping[str, Any], key: str, why: str) -> None:
    if data.get(key) is not None:
        raise RecipeError(f"{key}: not supported by mergecli ({why})")


def _tokenizer(data: Mapping[str, Any], base_ref: str, recipe_models: list[dict], root: Path, dest: Path | None,
               notes: list[str]) -> dict[str, Any] | None:
    """mergecli's `tokenizer` for mergekit's `tokenizer_source`, `tokenizer` and `chat_template`,
    models named as the recipe names them (`base` for the recipe's base)."""
    by_path = {m["model"]: m["name"] for m in recipe_models}

    def named(ref: Any, where: str) -> str:
        if not isinstance(ref, str):
            raise RecipeError(f"{where}: expected a model's path or hub id")
        if ref == base_ref:
            return "base"
        found = by_path.get(_rebase(_strip_lora(ref), root, dest))
        if found is None:
            raise RecipeError(f"{where}: {ref!r} is neither base_model nor a model the config merges; mergecli reads "
                              "the vocabularies of the models it merges", "add it to the merge or choose another")
        return found

    out: dict[str, Any] = {}
    tokenizer = data.get("tokenizer")
    if tokenizer is not None and data.get("tokenizer_source") is not None:
        raise RecipeError("tokenizer: give tokenizer or tokenizer_source, not both (as mergekit)")
    if data.get("tokenizer_source") is not None:
        source, key = data["tokenizer_source"], "tokenizer_source"
        out["source"] = source if source in ("union", "base") else named(source, key)
    elif tokenizer is not None:
        if not isinstance(tokenizer, Mapping):
            raise RecipeError("tokenizer: expected a mapping (source, tokens, pad_to_multiple_of)")
        unknown = set(tokenizer) - {"source", "tokens", "pad_to_multiple_of"}
        if unknown:
            raise RecipeError(f"tokenizer.{sorted(unknown)[0]}: not a mergekit tokenizer key")
        source = tokenizer.get("source", "union")  # mergekit's default
        out["source"] = source if source in ("union", "base") else named(source, "tokenizer.source")
        tokens = tokenizer.get("tokens") or {}
        if not isinstance(tokens, Mapping):
            raise RecipeError("tokenizer.tokens: expected a mapping of tokens to {source, force}")
        if tokens:
            out["tokens"] = {str(t): _token_rule(rule, f"tokenizer.tokens.{t}", named) for t, rule in tokens.items()}
        if tokenizer.get("pad_to_multiple_of") is not None:
            out["pad_to_multiple_of"] = tokenizer["pad_to_multiple_of"]
    if data.get("chat_template") is not None:
        try:
            chat_template_text(str(data["chat_template"]))
        except ValueError as exc:
            raise RecipeError(str(exc)) from None
        out["chat_template"] = str(data["chat_template"])
    if out.get("source") is not None and data.get("base_model") is None:
        notes.append(f"tokenizer: without base_model mergekit takes the vocabulary's base from a set of the models "
                     f"(any of them, run to run); mergecli takes the recipe's base ({base_ref})")
    return out or None


def _token_rule(rule: Any, where: str, named: Callable[[Any, str], str]) -> dict[str, Any]:
    """One `tokenizer.tokens` entry: its source (a model's row, another token's row, zeros) and force."""
    if not isinstance(rule, Mapping):
        raise RecipeError(f"{where}: expected a mapping with source (and force)")
    unknown = set(rule) - {"source", "force"}
    if unknown:
        raise RecipeError(f"{where}.{sorted(unknown)[0]}: not a mergekit token key (source, force)")
    source = rule.get("source")
    if source is None:
        raise RecipeError(f"{where}.source: required (mergekit has no row to give a token without one)")
    if isinstance(source, Mapping):
        kind = source.get("kind")
        if kind == "zero":
            out: Any = "zero"
        elif kind == "model_token":
            out = {"model": named(source.get("model"), f"{where}.source.model")}
            for key in ("token", "token_id"):
                if source.get(key) is not None:
                    out[key] = source[key]
        else:
            raise RecipeError(f"{where}.source.kind: expected model_token or zero, got {kind!r}")
    else:
        out = named(source, f"{where}.source")
    return {"source": out, **({"force": bool(rule["force"])} if rule.get("force") else {})}


def _dtype(data: Mapping[str, Any], notes: list[str]) -> str | None:
    """mergecli's output dtype: mergekit's `out_dtype`, else its `dtype`."""
    chosen = None
    for key in ("dtype", "out_dtype"):
        value = data.get(key)
        if value is None:
            continue
        value = str(value).removeprefix("torch.")
        if value not in DTYPES:
            raise RecipeError(f"{key}: {data[key]!r} is not supported (mergecli writes {', '.join(sorted(DTYPES))})")
        chosen = value
    if data.get("dtype") is not None and str(data["dtype"]).removeprefix("torch.") != "float32":
        notes.append(f"dtype: {data['dtype']}: mergekit also computes in it; mergecli computes in float32 and writes "
                     f"{chosen} (outputs differ by at most one rounding of {chosen})")
    return chosen


Source = tuple[str, list[Mapping[str, Any]], str]
"""(model reference, parameter levels from highest precedence down, where it is in the config)"""


@dataclass
class Slice:
    """One output slice (or the `models:` list): its sources, the levels of shared parameters
    (highest first) and where each is, and each source's layer range (None: the whole model)."""

    sources: list[Source]
    levels: list[Mapping[str, Any]]
    level_names: list[str]
    ranges: list[tuple[int, int] | None]
    where: str = ""  # "slices.N"; "" for models:
    base: Any = None  # the slice's own base_model

    def range_of(self, ref: str) -> tuple[int, int] | None:
        return next(r for (source, _, _), r in zip(self.sources, self.ranges) if source == ref)


def _slices(data: Mapping[str, Any]) -> tuple[list[Slice], bool]:
    """The output slices (one for `models:`) and whether the config gave `models:`."""
    top = _params(data.get("parameters"), "parameters")
    if data.get("models") is not None and data.get("slices") is not None:
        raise RecipeError("models: give either models or slices, not both (as mergekit)")
    if data.get("models") is not None:
        entries = data["models"]
        if not isinstance(entries, list) or not entries:
            raise RecipeError("models: expected a non-empty list of {model: ..., parameters: ...}")
        sources = []
        for i, entry in enumerate(entries):
            ref, params = _model_entry(entry, f"models.{i}", {"model", "parameters"})
            sources.append((ref, [params, top], f"models.{i}"))
        return [Slice(sources, [top], ["parameters"], [None] * len(sources))], True
    slices = data.get("slices")
    if not isinstance(slices, list) or not slices:
        raise RecipeError("models: a mergekit config needs models (or slices)")
    found = []
    for index, out in enumerate(slices):
        at = f"slices.{index}"
        if not isinstance(out, Mapping):
            raise RecipeError(f"{at}: expected a mapping with sources")
        unknown = set(out) - {"sources", "parameters", "base_model", "residual_weight"}
        if unknown:
            raise RecipeError(f"{at}.{sorted(unknown)[0]}: not a mergekit slice key")
        if out.get("residual_weight") is not None:
            raise RecipeError(f"{at}.residual_weight: not supported by mergecli")
        if out.get("base_model") not in (None, data.get("base_model")) and data.get("merge_method") != "passthrough":
            raise RecipeError(f"{at}.base_model: a per-slice base differing from base_model is not supported")
        slice_params = _params(out.get("parameters"), f"{at}.parameters")
        sources, ranges = [], []
        for i, entry in enumerate(out.get("sources") or []):
            where = f"{at}.sources.{i}"
            ref, params = _model_entry(entry, where, {"model", "parameters", "layer_range"})
            layer_range = entry.get("layer_range")
            if not (isinstance(layer_range, list) and len(layer_range) == 2
                    and all(isinstance(x, int) and not isinstance(x, bool) for x in layer_range)
                    and 0 <= layer_range[0] < layer_range[1]):
                raise RecipeError(f"{where}.layer_range: expected [first, end] with 0 <= first < end, got "
                                  f"{layer_range!r}")
            if ranges and layer_range[1] - layer_range[0] != ranges[0][1] - ranges[0][0]:
                raise RecipeError(f"{where}.layer_range: {layer_range} has {layer_range[1] - layer_range[0]} layers, "
                                  f"the slice's first source {ranges[0][1] - ranges[0][0]} (mergekit requires the "
                                  "same number in every source of a slice)")
            if any(ref == other for other, _, _ in sources):
                raise RecipeError(f"{where}.model: {ref!r} is listed twice in this slice (mergekit refuses duplicate "
                                  "inputs too)")
            sources.append((ref, [params, slice_params, top], where))
            ranges.append((layer_range[0], layer_range[1]))
        if not sources:
            raise RecipeError(f"{at}.sources: no models")
        found.append(Slice(sources, [slice_params, top], [f"{at}.parameters", "parameters"], ranges, at,
                           out.get("base_model")))
    return found, False


def _covers_whole_models(one: Slice, layers_of: Callable[[str], int | None]) -> bool:
    """Whether every source's range is its whole model (then a merge of the base's tensors; a model
    whose depth cannot be read is taken as layers, which merge the same)."""
    return all(r is None or (r[0] == 0 and r[1] == layers_of(_strip_lora(ref)))
               for (ref, _, _), r in zip(one.sources, one.ranges))


def _model_entry(entry: Any, where: str, keys: set[str]) -> tuple[str, Mapping[str, Any]]:
    if not isinstance(entry, Mapping) or "model" not in entry:
        raise RecipeError(f"{where}: expected a mapping with 'model'")
    unknown = set(entry) - keys
    if unknown:
        raise RecipeError(f"{where}.{sorted(unknown)[0]}: not a mergekit key here (known: {', '.join(sorted(keys))})")
    if not isinstance(entry["model"], str):
        raise RecipeError(f"{where}.model: expected a path or hub id (optionally id@revision or model+lora)")
    return entry["model"], _params(entry.get("parameters"), f"{where}.parameters")


def _params(value: Any, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise RecipeError(f"{where}: expected a mapping of parameter names to values")
    return value


def _split_base(name: str, method: MethodMap, base: str | None, one: Slice,
                notes: list[str]) -> tuple[str, list[Mapping[str, Any]], list[Source]]:
    """The recipe's base, the base's own parameter levels (linear weighs it), and the other models
    of one output slice (or of `models:`, which mergekit turns into one slice with base_model
    appended when not listed; a slice's sources are taken as they are)."""
    sources = one.sources
    known = set(method.shared) | set(method.per_model)
    for ref, levels, where in sources:
        for key, value in levels[0].items():
            if key in method.shared:
                raise RecipeError(f"{where}.parameters.{key}: mergekit reads {key!r} only from the top-level "
                                  "parameters (it would ignore it here)")
            _check_value(key, value, f"{where}.parameters.{key}", name, known)
    for level, where in zip(one.levels, one.level_names):
        for key, value in level.items():
            _check_value(key, value, f"{where}.{key}", name, known)
    refs = [ref for ref, _, _ in sources]
    for ref, _, where in sources:
        if refs.count(ref) > 1:
            raise RecipeError(f"{where}.model: {ref!r} is listed twice (mergekit refuses duplicate inputs too)")
    appended = not one.where  # models: mergekit adds a base_model it does not find among them
    listed = [s for s in sources if s[0] == base]
    if base is not None and not listed and not appended and method.base not in ("optional", "points"):
        raise RecipeError(f"{one.where}.sources: base_model {base!r} is not among this slice's sources, and mergekit's "
                          f"{name} needs it there")
    if base is None or (not listed and not appended):
        if base is None and method.base not in ("optional", "origin", "points"):
            raise RecipeError(f"base_model: required by mergekit's {name}")
        # linear: the first model's weights are the reference of the average; nuslerp, multislerp: the
        # first point; karcher: the first of its equal points
        first, levels, where = sources[0]
        if "weight" in method.per_model and all(level.get("weight") is None for level in levels):
            raise RecipeError(f"{where}.parameters.weight: required by mergekit's {name} (it has no default)")
        if base is not None and method.base == "optional":  # linear over a slice without base_model: weight 0
            return _strip_lora_base(base, "base_model"), [], sources
        return _strip_lora_base(first, where), levels, sources[1:]
    if not isinstance(base, str):
        raise RecipeError("base_model: expected a path or hub id")
    others = [s for s in sources if s[0] != base]
    if method.base == "points":  # mergekit's inputs: the models as listed, then base_model if not among them
        inputs = sources if listed else [*sources, (base, [], "base_model")]
        first, _, where = inputs[0]
        return _strip_lora_base(first, where), [], inputs[1:]
    if method.base == "optional":
        levels = listed[0][1] if listed else sources[0][1][1:]  # an added base gets only the shared levels
        return _strip_lora_base(base, "base_model"), levels, others
    if listed and listed[0][1][0] and method.per_model:
        notes.append(f"{listed[0][2]}.parameters: ignored, as in mergekit: the base model of {name} takes no "
                     "per-model parameters")
    return _strip_lora_base(base, "base_model"), [], others


def _count_inputs(name: str, method: MethodMap, others: int, with_base: bool, where: str = "") -> None:
    """mergekit's input counts for `method` (`others`: the models besides the recipe's base)."""
    low, high = method.min_models, method.max_models
    if method.base == "points":
        count, what = others + 1, " input models (base_model included)"
    elif method.base == "origin" and not with_base:
        count, what = others + 1, " models without a base_model"
        low = max(low, 2)  # the first is the recipe's base: at least one more to merge it with
    else:
        count, what = others, " model(s) besides the base"
    if count < low or (high is not None and count > high):
        want = f"exactly {low}" if low == high else f"at least {low}"
        alone = " (one model alone would be returned unchanged)" if low > method.min_models else ""
        raise RecipeError(f"{where + '.sources' if where else 'models'}: mergekit's {name} needs {want}{what}, got "
                          f"{count}{alone}")


def _strip_lora(ref: str) -> str:
    return ref.split("+", 1)[0]


def _strip_lora_base(ref: str, where: str) -> str:
    if "+" in ref:
        raise RecipeError(f"{where}: a LoRA applied to the base ({ref!r}) is not supported as the base",
                          "merge the adapter into the base first")
    return ref


def _lora_or_model(ref: str, base: str, where: str) -> str:
    """mergekit's `model+lora` is a LoRA fine-tune: mergecli takes the adapter itself, if its model
    is the base."""
    if "+" not in ref:
        return ref
    model, lora = ref.split("+", 1)
    if model != base:
        raise RecipeError(f"{where}.model: {ref!r} applies a LoRA to {model!r}, not to base_model {base!r}",
                          "mergecli takes LoRA adapters of the base only")
    return lora


def _emit(target: dict[str, Any], key: str, setting: Any, where: str, name: str, method: MethodMap,
          notes: list[str], explicit: bool) -> None:
    """Write one parameter into a variant (or a variant's model entry) in mergecli's terms."""
    if key in method.inert:
        if explicit:
            notes.append(f"{where}: {setting!r} dropped: it does not change mergekit's {name} result"
                         + (" (only the dtype of its sign mask)" if key == "int8_mask" else ""))
        return
    if key in BOOLEAN:
        target[key] = ("l1" if setting else "none") if key == "rescale" else setting
    else:
        target[key] = _numeric(setting)


def _check_value(key: str, value: Any, where: str, name: str, known: set[str]) -> None:
    """One parameter setting as written at one level of the config: a known parameter, booleans
    as constants, numbers as scalars / gradients / filter lists, densities in (0, 1]."""
    if key not in known:
        raise RecipeError(f"{where}: not a parameter of mergekit's {name} (mergekit would ignore it)",
                          f"its parameters: {', '.join(sorted(known)) or 'none'}")
    if key in BOOLEAN:
        if not isinstance(value, bool):
            raise RecipeError(f"{where}: expected true or false; per-tensor schedules of {key} are not supported")
        return
    try:
        schedule.check(value, where)
    except ValueError as exc:
        raise RecipeError(str(exc)) from None
    for number in _leaves(_numeric(value, where)):
        if key == "density" and not 0 < number <= 1:
            raise RecipeError(f"{where}: density {number} outside (0, 1]")


def _leaves(setting: Any) -> list[Any]:
    if isinstance(setting, Mapping):
        return _leaves(setting["value"])
    if isinstance(setting, (list, tuple)):
        return [leaf for item in setting for leaf in _leaves(item)]
    return [setting]


def _numeric(setting: Any, where: str = "") -> Any:
    """The setting with every value a number: YAML reads `1e-3` as a string, which mergekit
    (pydantic) accepts as a float, so mergecli does too."""
    if isinstance(setting, Mapping):
        return {**setting, "value": _numeric(setting["value"], where)}
    if isinstance(setting, (list, tuple)):
        return [_numeric(item, where) for item in setting]
    if isinstance(setting, (int, float)) and not isinstance(setting, bool):
        return setting
    try:
        return float(setting) if isinstance(setting, str) else _not_a_number(setting, where)
    except ValueError:
        return _not_a_number(setting, where)


def _not_a_number(value: Any, where: str) -> Any:
    raise RecipeError(f"{where}: expected numbers, got {value!r}")


def _unique(name: str, used: set[str]) -> str:
    candidate, n = name, 2
    while candidate in used:
        candidate, n = f"{name}-{n}", n + 1
    used.add(candidate)
    return candidate


def _rebase(ref: str, root: Path, dest: Path | None) -> str:
    """A local path relative to `root` rewritten relative to `dest` (hub ids unchanged)."""
    if dest is None or not is_local_reference(ref, root):
        return ref
    absolute = (root / Path(ref).expanduser()).resolve()
    return os.path.relpath(absolute, dest.resolve())


def read_num_layers(ref: str, root: Path) -> int | None:
    """Decoder layers of a local model from its config.json (None if not local or not found)."""
    if not is_local_reference(ref, root):
        return None
    config = (root / Path(ref).expanduser()) / "config.json"
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError):
        return None
    data = data.get("text_config", data)
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(data.get(key), int):
            return data[key]
    return None


def import_config(path: Path, dest: Path | None = None, data: Any = None) -> Translation:
    """Read a mergekit YAML file (unless `data` is given: its contents, already read) and translate
    it (`mergecli recipes import`, and any command given a mergekit config); paths in the recipe
    are relative to `dest` (default: the config's folder)."""

    path = Path(os.path.abspath(path))
    if data is None:
        documents = read_yaml_file(path, "mergekit config", documents=True)
        if len(documents) > 1:
            raise RecipeError(f"{path}: a multi-stage file ({len(documents)} documents); run it as it is "
                              f"(mergecli merge {path.name}): recipes import translates one document",
                              "or import each document from a file of its own")
        data = documents[0]
    if not is_mergekit_config(data):
        raise RecipeError(f"{path}: not a mergekit config (it has no merge_method)")
    label = re.sub(r"[^A-Za-z0-9._+-]", "-", path.stem).lstrip("._+-") or None
    return translate(data, path.parent, dest if dest is not None else path.parent, label=label)
