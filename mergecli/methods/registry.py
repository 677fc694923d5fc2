"""Merge methods registered by name, and the per-tensor pipeline they share.

A method is one combine function registered with how its task vectors are trimmed; adding one is
one decorated function. `merge_tensor` is pure (tensors in, tensor out): orient out x in ->
score -> select -> (rescale) -> combine -> orient back.

Selection: TIES-style methods keep the exact top-k of a ranking score; DARE-style methods
(`rescale=True`) are stochastic and unbiased: Bernoulli(d) with the `random` score, or
rank-dependent keep-probabilities with a ranking score (see `rank_probabilities`), survivors
divided by their keep-probability.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Protocol, Sequence

import torch

from .combine import disjoint_mean, weighted_sum
from .hessian_math import DegenerateStatistics, obs_trim, regmean_delta
from .scores import SCORES
from .sparsify import bernoulli_mask, rank_probabilities, tensor_generator, topk_mask
from .stats import LayerStats


class CombineFn(Protocol):
    def __call__(self, trimmed: Sequence[torch.Tensor], weights: torch.Tensor, stats: list[LayerStats | None],
                 params: "TrimParams") -> torch.Tensor: ...


@dataclass(frozen=True)
class Method:
    name: str
    combine: CombineFn
    sparsify: bool
    rescale: bool
    default_score: str | None
    default_density: float
    needs_stats: bool
    doc: str


METHODS: dict[str, Method] = {}


def register_method(name: str, *, sparsify: bool, rescale: bool = False, default_score: str | None = None,
                    default_density: float = 0.2, needs_stats: bool = False) -> Callable[[CombineFn], CombineFn]:
    def decorate(fn: CombineFn) -> CombineFn:
        METHODS[name] = Method(name, fn, sparsify, rescale, default_score, default_density, needs_stats,
                               (fn.__doc__ or "").strip())
        return fn
    return decorate


@register_method("task_arithmetic", sparsify=False)
def task_arithmetic(trimmed, weights, stats, params):
    """theta_base + lambda * sum_i w_i tau_i (whole task vectors)."""
    return weighted_sum(trimmed, weights)


@register_method("linear", sparsify=True, default_score="magnitude")
def linear(trimmed, weights, stats, params):
    """Trimmed task arithmetic: keep the top-k by score, then sum_i w_i t_i (no rescale)."""
    return weighted_sum(trimmed, weights)


@register_method("ties", sparsify=True, default_score="magnitude")
def ties(trimmed, weights, stats, params):
    """Trim to density, elect signs, disjoint weighted mean (Yadav et al. 2023)."""
    return disjoint_mean(trimmed, weights)


@register_method("dare_linear", sparsify=True, rescale=True, default_score="random")
def dare_linear(trimmed, weights, stats, params):
    """Drop, rescale survivors by 1/keep-probability, weighted sum (Yu et al. 2023)."""
    return weighted_sum(trimmed, weights)


@register_method("dare_ties", sparsify=True, rescale=True, default_score="random")
def dare_ties(trimmed, weights, stats, params):
    """Drop and rescale as DARE, then TIES' sign election and disjoint mean."""
    return disjoint_mean(trimmed, weights)


@register_method("regmean", sparsify=True, default_score="magnitude", default_density=1.0, needs_stats=True)
def regmean(trimmed, weights, stats, params):
    """Linear layers: (sum w_i W_i G~_i)(sum w_i G~_i)^-1 (Jin et al. 2023); other tensors: weighted mean."""
    if all(s is not None for s in stats):
        return regmean_delta(trimmed, [s.gram for s in stats], weights, params.alpha)
    return weighted_sum(trimmed, weights) / weights.sum()


@dataclass(frozen=True)
class TrimParams:
    score: str | None
    density: float
    per_row: bool = False
    seed: int = 0
    compensate: bool = False
    alpha: float = 0.9


def trim(tau: torch.Tensor, params: TrimParams, rescale: bool, tensor_name: str, model_index: int,
         stats: LayerStats | None = None) -> torch.Tensor:
    """Keep the selected entries of one task vector (oriented out x in)."""
    if params.score is None or (params.density >= 1.0 and not rescale):
        return tau
    score = SCORES[params.score]
    if score.needs_stats and stats is None:
        score = SCORES["magnitude"]
    if params.compensate and stats is not None:
        return obs_trim(tau, stats.gram, params.density, stats.damp)
    generator = tensor_generator(params.seed, tensor_name, model_index)
    if score.selection == "bernoulli":
        mask = bernoulli_mask(tau.shape, params.density, generator).to(tau.device)
        keep_p: torch.Tensor | float = params.density
    elif rescale:
        keep_p = rank_probabilities(score.fn(tau, stats), params.density, params.per_row).to(tau.device)
        mask = torch.rand(tau.shape, generator=generator, dtype=torch.float64).to(tau.device) < keep_p
    else:
        keep = topk_mask(score.fn(tau, stats), params.density, per_row=params.per_row)
        return tau.masked_fill(~keep, 0.0)
    if not rescale:
        return tau * mask
    return torch.where(mask, tau / keep_p, torch.zeros_like(tau)).to(tau.dtype)


def merge_tensor(method: Method, taus: Iterable[torch.Tensor | None], weights: list[float], params: TrimParams,
                 tensor_name: str, transposed: bool = False,
                 stats: list[LayerStats | None] | None = None) -> tuple[torch.Tensor, int, int]:
    """Merged delta for one tensor, plus (entries kept, entries offered) for the density report.

    `taus` may be a lazy iterable: each task vector is trimmed as soon as it arrives, so only one
    untrimmed copy is alive at a time. A model without this tensor (e.g. a LoRA that did not
    target it) contributes nothing: it neither votes in TIES nor counts in a mean. `transposed`
    marks weights stored in x out (GPT-2's Conv1D); all math sees them out x in.
    """
    trimmed, used_weights, used_stats = [], [], []
    for i, tau in enumerate(taus):
        if tau is None:
            continue
        s = stats[i] if stats else None
        tau = (tau.T if transposed else tau).float()
        if method.sparsify:
            try:
                tau = trim(tau, params, method.rescale, tensor_name, i, s)
            except DegenerateStatistics:
                tau = trim(tau, params, method.rescale, tensor_name, i, None)
        trimmed.append(tau)
        used_weights.append(weights[i])
        used_stats.append(s)
    if not trimmed:
        raise ValueError(f"{tensor_name}: no task vector has this tensor")
    kept = sum(int(torch.count_nonzero(t)) for t in trimmed)
    delta = method.combine(trimmed, torch.tensor(used_weights, dtype=torch.float32), used_stats, params)
    return (delta.T if transposed else delta).contiguous(), kept, sum(t.numel() for t in trimmed)
