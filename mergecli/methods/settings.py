"""A variant's parameters and weights as settings, resolved for one tensor at a time.

A recipe gives each method parameter, and each model's weight, a setting (`schedule`): one value,
a gradient over depth, or a list of {filter | regex, value} entries. The merge resolves every
setting for each tensor from its name and layer before the pipeline sees it, so the pipeline only
ever gets numbers. Precedence is mergekit's: a model's own setting, then the variant's, then the
default; a filter list that matches nothing falls through to the next.

The method's rules across parameters (`Method.check`: DELLA's density +- epsilon, TIES' weight
sum, ...) hold for resolved values: the recipe checks them when every setting is one value, and
the merge stage checks every tensor of the base before any work when some setting varies.

No torch here: the recipe imports this while it validates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

from . import schedule
from .table import WEIGHT, Method


@dataclass(frozen=True)
class Resolved:
    """The numbers one tensor is merged with."""

    params: dict[str, Any]  # the variant's values
    model_params: list[dict[str, Any]]  # per model: its own values where it sets them (weight excluded)
    weights: list[float]


@dataclass(frozen=True)
class VariantSettings:
    method: Method
    params: Mapping[str, Any]  # every declared parameter (defaults filled), as settings
    model_params: Sequence[Mapping[str, Any]]  # per merged model: the settings it overrides
    weights: Sequence[Sequence[Any]]  # per merged model: weight settings, highest precedence first
    fields: Sequence[str]  # per merged model: where its own settings are, e.g. "models.1."

    def constant(self) -> bool:
        settings = [*self.params.values(), *(v for own in self.model_params for v in own.values()),
                    *(w for levels in self.weights for w in levels if w is not None)]
        return all(schedule.is_constant(s) for s in settings)

    def at(self, tensor_name: str, layer: int | None, num_layers: int) -> Resolved:
        def value(name: str, levels: Sequence[Any], default: Any) -> Any:
            param = self.method.param(name) or WEIGHT
            return schedule.resolve_first(levels, tensor_name, layer, num_layers, param.coerce, default)

        params = {name: value(name, [s], self.method.param(name).default) for name, s in self.params.items()}
        own = [{name: value(name, [s], params[name]) for name, s in settings.items()}
               for settings in self.model_params]
        weights = [value("weight", levels, WEIGHT.default) for levels in self.weights]
        return Resolved(params, own, weights)

    def check(self, values: Resolved) -> None:
        """The method's rules on one tensor's values; ValueError naming the field (relative to the
        variant) otherwise."""
        rule = self.method.check
        if rule is None:
            return
        rule(values.params, values.weights)
        for own, where in zip(values.model_params, self.fields):
            if own:
                try:
                    rule({**values.params, **own}, values.weights)
                except ValueError as exc:
                    raise ValueError(f"{where}{exc}") from None

    def check_tensors(self, names: Iterable[str], layer_of: Callable[[str], int | None], num_layers: int) -> None:
        """`check` for every tensor (a varying setting can break a rule in one layer only); the
        error names the first tensor that breaks it."""
        for name in names:
            try:
                self.check(self.at(name, layer_of(name), num_layers))
            except ValueError as exc:
                raise ValueError(f"{exc} (for tensor {name})") from None


def settings_of(merge: Any, models: Sequence[Any]) -> VariantSettings:
    """The settings of a recipe variant (`recipe.MergeSpec`) over its models (`recipe.ModelSpec`s)."""
    order = merge.model_names or []
    own = [{k: v for k, v in merge.model_params(m.name).items() if k != "weight"} for m in models]
    weights = [[merge.model_params(m.name).get("weight"), m.weight] for m in models]
    fields = [f"models.{order.index(m.name)}." if m.name in order else "" for m in models]
    return VariantSettings(merge.method_spec, merge.params, own, weights, fields)
