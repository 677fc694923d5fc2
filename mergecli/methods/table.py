"""The method table: what a merge method is, which hyperparameters it takes, and registration by name.

A method is one combine function plus a declaration: its parameters (name, type, default, range),
how its task vectors are trimmed first, and what it needs besides them (calibration statistics,
the base weights, the whole tensor at once). The recipe validates a variant against this
declaration, so a new method with a new parameter is one decorated function in one module of
this package (every module here is imported by `catalog()`).

This module imports no torch: the CLI reads the table to validate recipes and print help quickly.
"""

from __future__ import annotations

import difflib
import importlib
import math
import pkgutil
from pathlib import Path
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping, Protocol, Sequence

from . import schedule

if TYPE_CHECKING:
    import torch

    from .stats import LayerStats, TokenCounts


AUTO = "auto"  # one value the merge chooses from calibration data (`Param.auto`, `search.py`)
LEARNED = "learned"  # a scale per layer module and model, learned on calibration data (`learn.py`)


class CombineFn(Protocol):
    """`linear`: the tensor is a linear layer's weight (not an embedding, a norm or a bias)."""

    def __call__(self, trimmed: Sequence["torch.Tensor"], weights: "torch.Tensor", *, params: Mapping[str, Any],
                 stats: Sequence["LayerStats | TokenCounts | None"], base: "torch.Tensor | None",
                 linear: bool) -> "torch.Tensor": ...


class PartsFn(Protocol):
    """Several merges of the same trimmed task vectors at once, model i's times `scalings[p][i]` in
    merge p (None: 1 for every model), as `CombineFn` gives each; None where the method has no
    shortcut for these inputs (then it is combined once per scaling)."""

    def __call__(self, trimmed: Sequence["torch.Tensor"], scalings: Sequence[Sequence[float] | None],
                 weights: "torch.Tensor", *, params: Mapping[str, Any],
                 stats: Sequence["LayerStats | TokenCounts | None"], base: "torch.Tensor | None",
                 linear: bool) -> "list[torch.Tensor] | None": ...


@dataclass(frozen=True)
class Param:
    """One hyperparameter: its type, default and allowed range, checked when a recipe is read."""

    name: str
    type: type
    default: Any
    doc: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself is not allowed
    choices: tuple[str, ...] | None = None
    per_model: bool = False  # may differ per model (a variant's `models: [{name: ..., density: ...}]`)
    schedulable: bool = False  # may vary over depth (a list) or by tensor-name filters
    auto: bool = False  # may be `auto` or `learned`: chosen on held-out calibration windows by the merge

    def coerce(self, value: Any) -> Any:
        """One scalar as this parameter's type (`auto` and `learned` stay as they are where allowed)."""
        return value if self.auto and value in (AUTO, LEARNED) else self.type(value)

    def check(self, value: Any, field: str | None = None) -> Any:
        """The value as this parameter's type; ValueError("<field>: what is allowed") otherwise.

        A schedulable parameter also takes a per-tensor setting (a gradient over depth or a list of
        {filter | regex, value} entries, see `schedule`): each of its values is checked, and an
        error names its place (`t.1.value: must be in [0, 1], got 2`)."""
        field = field or self.name
        if self.auto and value in (AUTO, LEARNED):
            return value
        if self.schedulable and not schedule.is_constant(value):
            schedule.check(value, field)
            return schedule.map_values(value, field, self._checked)
        if isinstance(value, (list, tuple, dict)):
            raise ValueError(f"{field}: is the same for every tensor (no gradient or filter list), got {value!r}")
        return self._checked(value, field)

    def _checked(self, value: Any, field: str) -> Any:
        try:
            return self._scalar(value)
        except ValueError as exc:
            raise ValueError(f"{field}: {exc}") from None

    def _scalar(self, value: Any) -> Any:
        if self.type is bool:
            if not isinstance(value, bool):
                raise ValueError(f"must be true or false, got {value!r}")
            return value
        if self.type is str:
            if not isinstance(value, str) or (self.choices and value not in self.choices):
                close = difflib.get_close_matches(str(value), self.choices or (), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"must be one of {', '.join(self.choices or ())}, got {value!r}{hint}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"must be a number, got {value!r}")
        if self.type is int and value != int(value):
            raise ValueError(f"must be a whole number, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"must be a finite number, got {value!r}")
        below = value <= self.low if self.low_open else value < self.low if self.low is not None else False
        above = self.high is not None and value > self.high
        if below or above:
            raise ValueError(f"must be in {self.range_text()}, got {value!r}")
        return self.type(value)

    def range_text(self) -> str:
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        return f"{'(' if self.low_open or self.low is None else '['}{low}, {high}]"

    def with_default(self, default: Any) -> "Param":
        return replace(self, default=default)


Trim = Literal["none", "topk", "dare", "della", "breadcrumbs"]
Absent = Literal["skip", "zero"]


@dataclass(frozen=True)
class Method:
    name: str
    combine: CombineFn
    params: tuple[Param, ...]
    # none: whole task vectors; topk: exact top-k by score; dare: drop at random, rescale; della:
    # keep-probabilities rising with the rank of the score within a row; breadcrumbs: drop the
    # largest and the smallest scores (see `pipeline.plan_trim`)
    trim: Trim
    needs_stats: bool  # calibration statistics (H) for its linear layers
    needs_base: bool  # the base weights, not only task vectors
    elementwise: bool  # each merged entry depends only on the same entry of the inputs (chunkable)
    # the merge is linear in the trimmed task vectors: the sum of what each model alone gives (with
    # every model's statistics and weights), so each model's part may be scaled (`lambda: learned`)
    additive: bool
    doc: str
    check: Callable[[Mapping[str, Any], Sequence[float]], None] | None = field(default=None, repr=False)
    # a model without a tensor (a LoRA that did not target it) -- skip: it neither votes nor counts
    # (a consensus over the models that changed it); zero: its task vector is 0 with its weight (an
    # average of the models' weights, which equal the base's there)
    absent: Absent = "skip"
    # the merge at several scalings of the models' parts at once, sharing what they share (RegMean:
    # one factorization of the Gram sum for every part): `lambda: auto` / `learned` score the parts
    parts: PartsFn | None = field(default=None, repr=False)

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    def defaults(self) -> dict[str, Any]:
        return {p.name: p.default for p in self.params}


METHODS: dict[str, Method] = {}


def register_method(name: str, *, params: Sequence[Param], trim: Trim = "none", needs_stats: bool = False,
                    needs_base: bool = False, elementwise: bool = True, additive: bool = False,
                    check: Callable[[Mapping[str, Any], Sequence[float]], None] | None = None,
                    absent: Absent = "skip", parts: PartsFn | None = None) -> Callable[[CombineFn], CombineFn]:
    """Register `fn` as the combine step of method `name`; its docstring is the method's help.

    `check(params, weights)` is a rule across parameters (or over the models' weights), raising
    ValueError("<field>: <what is wrong>").
    """
    def decorate(fn: CombineFn) -> CombineFn:
        if name in METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        METHODS[name] = Method(name, fn, tuple(params), trim, needs_stats, needs_base, elementwise, additive,
                               (fn.__doc__ or "").strip(), check, absent, parts)
        return fn
    return decorate


def catalog() -> dict[str, Method]:
    """Every registered method (importing each module of this package registers its methods)."""
    for module in pkgutil.iter_modules([str(Path(__file__).parent)]):
        importlib.import_module(f"{__package__}.{module.name}")
    return METHODS


# -- parameters shared by several methods ------------------------------------------------------
SCORE_NAMES = ("magnitude", "random", "sparsegpt", "wanda")
LAMBDA = Param("lambda", float, 1.0, "scale of the merged task vector; auto: the scale whose merge keeps the most "
               "of the specialists' gain on held-out calibration windows; learned: one scale per layer module "
               "and fine-tune, learned on those windows (additive methods)", low=-100, high=100, schedulable=True,
               auto=True)
DENSITY = Param("density", float, 0.2, "fraction of each task vector kept", low=0.0, high=1.0, low_open=True,
                per_model=True, schedulable=True)
SCORE = Param("score", str, "magnitude", "which entries matter: magnitude | random | sparsegpt | wanda",
              choices=SCORE_NAMES)
TOPK = Param("topk", str, "tensor", "exact top-k per tensor or per output row", choices=("tensor", "row"))
SEED = Param("seed", int, 0, "seed of the random draws (with the tensor name and model index)", low=0, high=2**63 - 1)
DAMP = Param("damp", float, 0.01, "Hessian damping, relative to mean(diag H)", low=0.0, high=10.0, low_open=True)
COMPENSATE = Param("compensate", bool, False, "sparsegpt only: OBS error compensation of the kept entries")
ALPHA = Param("alpha", float, 0.9, "regmean: G~ = alpha G + (1 - alpha) diag G", low=0.0, high=1.0,
              schedulable=True)
NORMALIZE = Param("normalize", bool, False, "divide by the weights: a weighted mean (with a sign election: of the "
                  "agreeing models) instead of a weighted sum")
RESCALE_KEPT = Param("rescale", str, "none", "none | l1: scale the kept entries so |t|_1 = |tau|_1 per tensor "
                     "(mergekit's rescale)", choices=("none", "l1"))
RESCALE_DRAWN = Param("rescale", str, "inverse", "inverse: divide each kept entry by its keep-probability "
                      "(unbiased, as the DARE paper) | l1: scale so |t|_1 = |tau|_1 per tensor (mergekit) | none",
                      choices=("inverse", "l1", "none"))
RANKING = replace(SCORE, doc="which entries matter: magnitude | sparsegpt | wanda",
                  choices=tuple(s for s in SCORE_NAMES if s != "random"))
WEIGHT = Param("weight", float, 1.0, "a model's weight", low=-100, high=100, per_model=True, schedulable=True)
TRIM_TOPK = (DENSITY, SCORE, TOPK, COMPENSATE, DAMP, RESCALE_KEPT)
TRIM_DARE = (DENSITY, SCORE.with_default("random"), TOPK, SEED, DAMP, RESCALE_DRAWN)


def compensate_needs_sparsegpt(params: Mapping[str, Any], weights: Sequence[float]) -> None:
    if params.get("compensate") and params.get("score") != "sparsegpt":
        raise ValueError("compensate: true needs score: sparsegpt")


MAX_AMPLIFICATION = 10.0
"""A weighted mean sum_i w_i t_i / sum_i w_i is at most A = sum_i |w_i| / |sum_i w_i| times the largest
|t_i|: 1 when every weight is positive, without bound as a mix of signs sums towards zero (weights 1
and -0.999 give 1999). A variant whose means could exceed the task vectors this many times is refused
(mergekit divides silently); with positive weights it never applies."""


def amplification(weights: Sequence[float], subsets: bool = False) -> tuple[float, tuple[float, ...]]:
    """(A, the weights it is reached for): over all the weights, or, with `subsets`, over every
    non-empty subset of them (a sign election averages the models that agree on an entry, any set of
    them). A sum of exactly zero gives inf."""
    groups = [tuple(weights)]
    if subsets and any(w < 0 for w in weights):
        n = len(weights)
        if n > 16:  # 2^n subsets: bound them all by the worst pair of signs instead
            groups = [tuple(w for w in weights if w > 0) + tuple(w for w in weights if w < 0)]
        else:
            groups = [tuple(w for i, w in enumerate(weights) if mask >> i & 1) for mask in range(1, 1 << n)]

    def bound(group: tuple[float, ...]) -> float:
        total = abs(sum(group))
        return sum(map(abs, group)) / total if total > 0 else math.inf

    worst = max(groups, key=bound)
    return bound(worst), worst


def means_stay_bounded(weights: Sequence[float], subsets: bool, extra: str = "",
                       remedy: str = "normalize: false") -> None:
    """Refuse weights whose mean could amplify a task vector more than MAX_AMPLIFICATION times.
    `remedy`: the method's other way out, named after "use weights whose sums stay away from 0, or"."""
    a, group = amplification(weights, subsets)
    if a > MAX_AMPLIFICATION:
        which = "the weights" if len(group) == len(weights) else "the models weighted"
        raise ValueError(f"weight: {which} {', '.join(f'{w:g}' for w in group)}{extra} sum to {sum(group):g}; "
                         f"their weighted mean can be {a:.4g} times the largest task-vector entry (at most "
                         f"{MAX_AMPLIFICATION:g} is allowed): use weights whose sums stay away from 0, or "
                         f"{remedy}")


def normalized_mean_bounded(params: Mapping[str, Any], weights: Sequence[float]) -> None:
    """Additive methods with `normalize: true` divide by the sum of the weights."""
    if params.get("normalize"):
        means_stay_bounded(weights, subsets=False)
    compensate_needs_sparsegpt(params, weights)


def sign_election_needs_positive_weights(params: Mapping[str, Any], weights: Sequence[float]) -> None:
    """TIES elects each entry's sign by the weighted sum and divides by the agreeing weights: with
    weights summing to <= 0 the election is inverted or the mean divides by zero, and with a mix of
    signs the agreeing models' weights can sum to almost zero (`means_stay_bounded`)."""
    if sum(weights) <= 0:
        raise ValueError(f"weight: the models' weights sum to {sum(weights):g}; sign election needs a positive sum")
    if params.get("normalize", True):
        means_stay_bounded(weights, subsets=True)
    compensate_needs_sparsegpt(params, weights)


class Unbounded(ValueError):
    """A method's own divisor came near zero on one tensor (e.g. Model Stock's 1 + (N - 1) cos):
    the merged value would be many times the task vectors. The merge stops naming the tensor."""
