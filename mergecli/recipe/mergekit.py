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
from .schema import default_model_name

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

UNSUPPORTED = {"passthrough": "supported with slices only (stacking layer ranges of models), which mergecli does not "
                              "translate yet; over one whole model it is a copy of that model"}
"""mergekit methods mergecli knows but cannot run from a config, and why."""
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
    if name in UNSUPPORTED:
        raise RecipeError(f"merge_method: {name!r}: {UNSUPPORTED[name]}")
    if name not in METHODS:
        raise RecipeError(f"merge_method: {name!r} is not supported by mergecli",
                          f"supported mergekit methods: {', '.join(METHODS)}")
    method = METHODS[name]
    _refuse(data, "modules", "mergecli merges one model stack; per-module configs (multimodal) are not supported")
    _refuse(data, "chat_template", "mergecli copies the base's tokenizer files as they are; set it afterwards")
    extra_tokens = _tokenizer(data, notes)
    dtype = _dtype(data, notes)
    sources, shared_levels = _sources(data, root, layers_of or (lambda ref: read_num_layers(ref, root)))

    base_ref, base_levels, models = _split_base(name, method, data.get("base_model"), sources, data, notes)
    with_base = data.get("base_model") is not None
    _count_inputs(name, method, len(models), with_base)

    merge_name = str(data.get("name") or label or name)
    variant: dict[str, Any] = {"name": merge_name, "method": method.mergecli, **method.fixed}
    for key, default in method.shared.items():
        setting = schedule.chain(*(level.get(key) for level in shared_levels))
        where = _where(shared_levels, key)
        if setting is None and default is REQUIRED:
            raise RecipeError(f"parameters.{key}: required by mergekit's {name}")
        _emit(variant, key, default if setting is None else setting, where, name, method, notes, setting is not None)
    if method.base == "origin":
        variant["origin"] = "base" if with_base else "zero"
    if method.base == "optional" or (method.base == "origin" and not with_base):
        weight = schedule.chain(*(level.get("weight") for level in base_levels))
        if weight is None:
            raise RecipeError("parameters.weight: mergekit's linear averages the base_model in too and needs "
                              "its weight")
        schedule.check(weight, "parameters.weight")
        variant["base_weight"] = _numeric(weight)

    used_names: set[str] = set()
    recipe_models, variant_models = [], []
    for index, (ref, levels, where) in enumerate(models):
        model_name = _unique(default_model_name(_lora_or_model(ref, base_ref, where)), used_names)
        recipe_models.append({"name": model_name, "model": _rebase(_lora_or_model(ref, base_ref, where), root, dest)})
        entry: dict[str, Any] = {"name": model_name}
        for key, default in method.per_model.items():
            setting = schedule.chain(*(level.get(key) for level in levels))
            if setting is None and default is REQUIRED:
                raise RecipeError(f"{where}.parameters.{key}: required by mergekit's {name} (it has no default)")
            _emit(entry, key, default if setting is None else setting, f"{where}.parameters.{key}", name, method, notes,
                  setting is not None)
        variant_models.append(entry)
    if method.per_model:
        variant["models"] = variant_models
    else:
        variant["models"] = [m["name"] for m in recipe_models]
    if dtype:
        variant["dtype"] = dtype

    recipe: dict[str, Any] = {"name": str(data.get("name") or f"mergekit-{name}"),
                              "base": _rebase(base_ref, root, dest), "models": recipe_models, "merges": [variant],
                              "workspace": "workspace", "output_dir": "merged"}
    if extra_tokens:
        recipe["extra_tokens"] = extra_tokens
    notes.append(f"workspace, output_dir: not in mergekit configs; the cache goes to workspace/ and the merge to "
                 f"merged/{merge_name}/ next to the recipe (override with workspace=DIR output_dir=DIR)")
    return Translation(recipe, notes)


# -- parts -------------------------------------------------------------------------------------
def _refuse(data: Mapping[str, Any], key: str, why: str) -> None:
    if data.get(key) is not None:
        raise RecipeError(f"{key}: not supported by mergecli ({why})")


def _tokenizer(data: Mapping[str, Any], notes: list[str]) -> str | None:
    """mergecli's `extra_tokens` for mergekit's tokenizer settings it can honour: the base's."""
    source = data.get("tokenizer_source")
    key = "tokenizer_source"
    tokenizer = data.get("tokenizer")
    if tokenizer is not None:
        if not isinstance(tokenizer, Mapping):
            raise RecipeError("tokenizer: expected a mapping (source, tokens, pad_to_multiple_of)")
        for sub in ("tokens", "pad_to_multiple_of"):
            if tokenizer.get(sub) is not None:
                raise RecipeError(f"tokenizer.{sub}: not supported by mergecli (it keeps the base vocabulary or "
                                  "refuses fine-tunes with added tokens)")
        unknown = set(tokenizer) - {"source", "tokens", "pad_to_multiple_of"}
        if unknown:
            raise RecipeError(f"tokenizer.{sorted(unknown)[0]}: not a mergekit tokenizer key")
        source, key = tokenizer.get("source", "union"), "tokenizer.source"
    if source is None:
        return None
    if source == "base" or source == data.get("base_model"):
        notes.append(f"{key}: {source}: the base's vocabulary and tokenizer (mergecli extra_tokens: base); "
                     "rows of tokens a fine-tune added are dropped, as mergekit does")
        return "base"
    raise RecipeError(f"{key}: {source!r} is not supported by mergecli",
                      "mergekit builds a union vocabulary and re-maps every model's embeddings; mergecli keeps the "
                      "base's (tokenizer_source: base) or refuses fine-tunes with added tokens")


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


def _sources(data: Mapping[str, Any], root: Path,
             layers_of: Callable[[str], int | None]) -> tuple[list[Source], list[Mapping[str, Any]]]:
    """The input models with their parameter levels, and the levels of shared parameters."""
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
        return sources, [top]
    slices = data.get("slices")
    if not isinstance(slices, list) or not slices:
        raise RecipeError("models: a mergekit config needs models (or slices)")
    if len(slices) != 1:
        raise RecipeError("slices: more than one output slice stacks layers from several ranges; mergecli merges "
                          "whole models only", "use models: with one entry per model")
    out = slices[0]
    if not isinstance(out, Mapping):
        raise RecipeError("slices.0: expected a mapping with sources")
    unknown = set(out) - {"sources", "parameters", "base_model", "residual_weight"}
    if unknown:
        raise RecipeError(f"slices.0.{sorted(unknown)[0]}: not a mergekit slice key")
    if out.get("residual_weight") is not None:
        raise RecipeError("slices.0.residual_weight: not supported by mergecli")
    if out.get("base_model") not in (None, data.get("base_model")):
        raise RecipeError("slices.0.base_model: a per-slice base differing from base_model is not supported")
    slice_params = _params(out.get("parameters"), "slices.0.parameters")
    sources = []
    for i, entry in enumerate(out.get("sources") or []):
        where = f"slices.0.sources.{i}"
        ref, params = _model_entry(entry, where, {"model", "parameters", "layer_range"})
        layer_range = entry.get("layer_range")
        if not (isinstance(layer_range, list) and len(layer_range) == 2):
            raise RecipeError(f"{where}.layer_range: expected [first, end]")
        total = layers_of(_strip_lora(ref))
        if total is None:
            raise RecipeError(f"{where}.layer_range: cannot read the number of layers of {ref!r} to check the range "
                              "covers the whole model", "use models: instead of slices:")
        if list(layer_range) != [0, total]:
            raise RecipeError(f"{where}.layer_range: {list(layer_range)} is not the whole model [0, {total}]; "
                              "mergecli merges whole models (no layer stacking or pruning)")
        sources.append((ref, [params, slice_params, top], where))
    if not sources:
        raise RecipeError("slices.0.sources: no models")
    return sources, [slice_params, top]


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


def _split_base(name: str, method: MethodMap, base: str | None, sources: list[Source], data: Mapping[str, Any],
                notes: list[str]) -> tuple[str, list[Mapping[str, Any]], list[Source]]:
    """The recipe's base, the base's own parameter levels (linear weighs it), and the other models."""
    known = set(method.shared) | set(method.per_model)
    for ref, levels, where in sources:
        for key, value in levels[0].items():
            if key in method.shared:
                raise RecipeError(f"{where}.parameters.{key}: mergekit reads {key!r} only from the top-level "
                                  "parameters (it would ignore it here)")
            _check_value(key, value, f"{where}.parameters.{key}", name, known)
    levels_to_check = [(data.get("parameters") or {}, "parameters")]
    if data.get("slices"):
        levels_to_check.append((data["slices"][0].get("parameters") or {}, "slices.0.parameters"))
    for level, where in levels_to_check:
        for key, value in level.items():
            _check_value(key, value, f"{where}.{key}", name, known)
    refs = [ref for ref, _, _ in sources]
    for ref, _, where in sources:
        if refs.count(ref) > 1:
            raise RecipeError(f"{where}.model: {ref!r} is listed twice (mergekit refuses duplicate inputs too)")
    if base is None:
        if method.base not in ("optional", "origin", "points"):
            raise RecipeError(f"base_model: required by mergekit's {name}")
        # linear: the first model's weights are the reference of the average; nuslerp, multislerp: the
        # first point; karcher: the first of its equal points
        base, levels, where = sources[0]
        if "weight" in method.per_model and all(level.get("weight") is None for level in levels):
            raise RecipeError(f"{where}.parameters.weight: required by mergekit's {name} (it has no default)")
        return _strip_lora_base(base, where), levels, sources[1:]
    if not isinstance(base, str):
        raise RecipeError("base_model: expected a path or hub id")
    listed = [s for s in sources if s[0] == base]
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


def _count_inputs(name: str, method: MethodMap, others: int, with_base: bool) -> None:
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
        raise RecipeError(f"models: mergekit's {name} needs {want}{what}, got {count}{alone}")


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


def _where(levels: list[Mapping[str, Any]], key: str) -> str:
    """Where a shared parameter is set (for notes)."""
    return "slices.0.parameters." + key if len(levels) > 1 and key in levels[0] else f"parameters.{key}"


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
    from .yaml_io import read_yaml_file

    path = Path(os.path.abspath(path))
    data = read_yaml_file(path, "mergekit config") if data is None else data
    if not is_mergekit_config(data):
        raise RecipeError(f"{path}: not a mergekit config (it has no merge_method)")
    label = re.sub(r"[^A-Za-z0-9._+-]", "-", path.stem).lstrip("._+-") or None
    return translate(data, path.parent, dest if dest is not None else path.parent, label=label)
