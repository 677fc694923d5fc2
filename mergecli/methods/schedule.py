"""Per-tensor merge parameters: a scalar, a gradient over layer depth, or a list of filtered values.

The semantics are mergekit's (0.1.5, `config.evaluate_setting` and `plan.MergePlanner`), so a
mergekit config and its translated recipe give every tensor the same value:

- a scalar applies to every tensor;
- a list of numbers is a gradient: the tensor's depth position t in [0, 1] is mapped onto the list
  (`x = t * (len - 1)`) and the two neighbouring entries are interpolated linearly. A list of
  non-numbers (booleans, strings) picks `values[int(x)]` instead;
- a list of `{filter: ..., value: ...}` entries: the first entry whose `filter` is a *substring* of
  the tensor name (`*` or no filter: every tensor) gives the value, itself a scalar or a gradient.
  mergekit matches substrings, not regular expressions (`layers.1.` does not match `layers.10.`;
  as a regex it would), so `filter` keeps that meaning, and mergecli adds `regex:` entries
  (`re.search`) for patterns. No matching entry gives None: the parameter falls back to the next
  place that sets it, or to its default.

Depth position: a tensor of decoder layer i of L gets t = i / (L - 1) (t = 1 when L = 1, as in
mergekit); every tensor outside the layer stack (embeddings, final norm, lm_head) gets t = 0,
the gradient's first value: mergekit plans those tensors with t = 0, before and after the layers.
Which layer a tensor is in is the architecture's answer (`Architecture.layer_of`), passed in.

Everything here is pure: a setting, a tensor name, its layer and the layer count in, a value out.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Sequence, Union

Scalar = Union[bool, int, float, str]
Setting = Union[Scalar, Sequence[Any], Mapping[str, Any]]

_ENTRY_KEYS = {"filter", "regex", "value"}


def depth_position(layer: int | None, num_layers: int) -> float:
    """mergekit's gradient coordinate: i / (L - 1) inside the layer stack, 1 for a single layer,
    0 outside it."""
    if layer is None:
        return 0.0
    if num_layers <= 1:
        return 1.0
    if not 0 <= layer < num_layers:
        raise ValueError(f"layer {layer} outside a model of {num_layers} layers")
    return layer / (num_layers - 1)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (bool, int, float, str))


def _matches(entry: Mapping[str, Any], tensor_name: str) -> bool:
    if "regex" in entry:
        return re.search(entry["regex"], tensor_name) is not None
    pattern = entry.get("filter")
    return pattern is None or pattern == "*" or (bool(tensor_name) and str(pattern) in tensor_name)


def evaluate(setting: Setting, tensor_name: str, t: float, coerce: Callable[[Any], Any] = float) -> Any:
    """The value of `setting` for a tensor at depth position `t`; None when no filter matches.

    `coerce` validates and converts one scalar (mergekit's parameter type): `float` turns the
    YAML string "1e-3" into 0.001 before interpolation, as pydantic does in mergekit.
    """
    if isinstance(setting, Mapping):
        setting = [setting]
    if _is_scalar(setting):
        return coerce(setting)
    if not isinstance(setting, Sequence):
        raise ValueError(f"not a parameter setting: {setting!r}")
    if not setting:
        return None
    if all(_is_scalar(e) for e in setting):
        values = [coerce(e) for e in setting]
        x = t * (len(values) - 1)
        if not all(_is_number(v) for v in values):
            return values[int(x)]
        i0 = int(x)
        i1 = min(len(values) - 1, i0 + 1)
        frac = x - i0
        return coerce((1 - frac) * values[i0] + frac * values[i1])
    for entry in setting:
        if _matches(entry, tensor_name):
            return evaluate(entry["value"], tensor_name, t, coerce)
    return None


def resolve(setting: Setting, tensor_name: str, layer: int | None, num_layers: int,
            coerce: Callable[[Any], Any] = float) -> Any:
    """The value of `setting` for one tensor, in decoder layer `layer` (None: outside the stack) of
    a model with `num_layers` of them."""
    return evaluate(setting, tensor_name, depth_position(layer, num_layers), coerce)


def resolve_first(settings: Sequence[Setting | None], tensor_name: str, layer: int | None, num_layers: int,
                  coerce: Callable[[Any], Any] = float, default: Any = None) -> Any:
    """mergekit's precedence: the first place that sets the parameter *for this tensor* wins
    (a per-model setting, then the variant's, ...); a filter list that matches nothing falls
    through to the next place, and then to `default`."""
    for setting in settings:
        if setting is None:
            continue
        value = resolve(setting, tensor_name, layer, num_layers, coerce)
        if value is not None:
            return value
    return default


def chain(*settings: Setting | None) -> Setting | None:
    """One setting equivalent to trying `settings` in order (as `resolve_first` does).

    A scalar or a gradient always answers, so what follows it is dropped; a filter list is
    followed by the next setting as its fallback entries. Used to flatten mergekit's levels
    (source, slice, global) into one recipe value without changing any tensor's value.
    """
    entries: list[Any] = []
    for setting in settings:
        if setting is None or (isinstance(setting, (list, tuple)) and not setting):
            continue  # unset, or an empty list, which resolves to nothing in mergekit
        if isinstance(setting, Mapping):
            setting = [setting]
        if _is_scalar(setting) or all(_is_scalar(e) for e in setting):
            if not entries:
                return setting
            entries.append({"value": setting})
            return entries
        entries.extend(setting)
        if any("filter" not in e and "regex" not in e or e.get("filter") == "*" for e in setting):
            return entries  # an unconditional entry: nothing after it is reachable
    return entries or None


def check(setting: Any, field: str = "value") -> None:
    """Raise ValueError naming `field` if `setting` is not a scalar, a gradient or a filter list.

    An empty list, an entry without `value`, an unknown entry key, a filter that is not a string,
    an invalid regex or a list mixing numbers and entries are refused: mergekit would accept some
    of these and silently resolve them to nothing.
    """
    if isinstance(setting, Mapping):
        setting = [setting]
    if _is_scalar(setting):
        return
    if not isinstance(setting, (list, tuple)) or not setting:
        raise ValueError(f"{field}: expected a number, a list of numbers (gradient over layers) or a list of "
                         f"{{filter: ..., value: ...}} entries, got {setting!r}")
    if all(_is_scalar(e) for e in setting):
        return
    for i, entry in enumerate(setting):
        where = f"{field}.{i}"
        if not isinstance(entry, Mapping):
            raise ValueError(f"{where}: a list mixes plain values and {{filter, value}} entries")
        unknown = set(entry) - _ENTRY_KEYS
        if unknown:
            raise ValueError(f"{where}: unknown key {sorted(unknown)[0]!r} (an entry has filter or regex, and value)")
        if "value" not in entry:
            raise ValueError(f"{where}: missing 'value'")
        if "filter" in entry and "regex" in entry:
            raise ValueError(f"{where}: give either 'filter' (substring, as mergekit) or 'regex', not both")
        if "filter" in entry and not isinstance(entry["filter"], str):
            raise ValueError(f"{where}.filter: must be a string, got {entry['filter']!r}")
        if "regex" in entry:
            try:
                re.compile(entry["regex"])
            except (re.error, TypeError) as exc:
                raise ValueError(f"{where}.regex: not a regular expression: {exc}") from None
        value = entry["value"]
        gradient = isinstance(value, (list, tuple)) and value and all(_is_scalar(e) for e in value)
        if not (_is_scalar(value) or gradient):
            raise ValueError(f"{where}.value: expected a number or a list of numbers, got {value!r}")


def map_values(setting: Setting, field: str, fn: Callable[[Any, str], Any]) -> Setting:
    """The setting (already `check`ed) with every value v replaced by fn(v, where v is): `field.1`
    for a gradient's second value, `field.0.value` or `field.0.value.2` inside a filter list, so
    a value's error names its place."""
    if _is_scalar(setting):
        return fn(setting, field)
    if isinstance(setting, Mapping):
        setting = [setting]
    if all(_is_scalar(e) for e in setting):
        return [fn(v, f"{field}.{i}") for i, v in enumerate(setting)]
    return [{**entry, "value": map_values(entry["value"], f"{field}.{i}.value", fn)} for i, entry in enumerate(setting)]


def is_constant(setting: Any) -> bool:
    """A plain scalar: the same value for every tensor."""
    return _is_scalar(setting)
