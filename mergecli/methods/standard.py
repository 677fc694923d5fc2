"""The classic merge methods: task arithmetic (whole and top-k-trimmed), TIES, DARE, RegMean.

Each is one registered combine function over trimmed task vectors (the pipeline trims first, as
its declaration says) returning the merged delta; the math itself lives in `combine.py`,
`consensus.py` and `hessian_math.py`. `normalize` divides by the weights: methods with a sign
election average the agreeing models by default, the others sum.
"""

from __future__ import annotations

from .combine import weighted_sum
from .consensus import added, elected
from .hessian_math import count_weighted_delta, regmean_delta, regmean_deltas
from .stats import LayerStats, TokenCounts
from .table import (ALPHA, DAMP, DENSITY, LAMBDA, NORMALIZE, SCORE, TOPK, TRIM_DARE, TRIM_TOPK, Param,
                    compensate_needs_sparsegpt, normalized_mean_bounded, register_method,
                    sign_election_needs_positive_weights)

MEAN = NORMALIZE.with_default(True)


@register_method("task_arithmetic", params=(LAMBDA, NORMALIZE), additive=True, check=normalized_mean_bounded)
def task_arithmetic(trimmed, weights, *, params, **_):
    """theta_base + lambda * sum_i w_i tau_i (whole task vectors)."""
    return added(trimmed, weights, params["normalize"])


@register_method("task_arithmetic_topk", params=(*TRIM_TOPK, LAMBDA, NORMALIZE), trim="topk", additive=True,
                 check=normalized_mean_bounded)
def task_arithmetic_topk(trimmed, weights, *, params, **_):
    """Trimmed task arithmetic: keep the top-k by score, then sum_i w_i t_i (no rescale; TIES without
    the sign election). Was called `linear`, which is now mergekit's weighted average (`interpolate.py`)."""
    return added(trimmed, weights, params["normalize"])


@register_method("ties", params=(*TRIM_TOPK, LAMBDA, MEAN), trim="topk", check=sign_election_needs_positive_weights)
def ties(trimmed, weights, *, params, **_):
    """Trim to density, elect signs, disjoint weighted mean (Yadav et al. 2023)."""
    return elected(trimmed, weights, params["normalize"])


@register_method("dare_linear", params=(*TRIM_DARE, LAMBDA, NORMALIZE), trim="dare", additive=True,
                 check=normalized_mean_bounded)
def dare_linear(trimmed, weights, *, params, **_):
    """Drop, rescale survivors by 1/keep-probability, weighted sum (Yu et al. 2023)."""
    return added(trimmed, weights, params["normalize"])


@register_method("dare_ties", params=(*TRIM_DARE, LAMBDA, MEAN), trim="dare",
                 check=sign_election_needs_positive_weights)
def dare_ties(trimmed, weights, *, params, **_):
    """Drop and rescale as DARE, then TIES' sign election and disjoint mean."""
    return elected(trimmed, weights, params["normalize"])


EMBEDDING = Param("embedding", str, "count", "regmean: input-embedding rows weighted by each model's calibration "
                  "token counts (count: RegMean's solution for a lookup) or the plain weighted mean (mean)",
                  choices=("count", "mean"))


def positive_weights(params, weights) -> None:
    """RegMean weighs each fine-tune's Gram matrix: a weight <= 0 makes sum_i w_i G~_i indefinite or
    singular, and its inverse unbounded."""
    if any(w <= 0 for w in weights):
        raise ValueError(f"weight: regmean weighs each model's statistics and needs positive weights, got "
                         f"{', '.join(f'{w:g}' for w in weights)}")
    compensate_needs_sparsegpt(params, weights)


def regmean_parts(trimmed, scalings, weights, *, params, stats, **_):
    """A linear layer's parts against one factorization (`hessian_math.regmean_deltas`)."""
    if all(isinstance(s, LayerStats) for s in stats):
        return regmean_deltas(trimmed, scalings, (s.gram for s in stats), weights, params["alpha"], fresh=True)
    return None


@register_method("regmean", params=(ALPHA, EMBEDDING, DENSITY.with_default(1.0), SCORE, TOPK, DAMP, LAMBDA),
                 trim="topk", needs_stats=True, elementwise=False, additive=True, check=positive_weights,
                 parts=regmean_parts)
def regmean(trimmed, weights, *, params, stats, **_):
    """Linear layers: (sum w_i W_i G~_i)(sum w_i G~_i)^-1 (Jin et al. 2023); the input embedding:
    each row's count-weighted mean (`embedding: count`); other tensors: weighted mean."""
    if all(isinstance(s, LayerStats) for s in stats):
        return regmean_delta(trimmed, (s.gram for s in stats), weights, params["alpha"], fresh=True)
    if params["embedding"] == "count" and all(isinstance(s, TokenCounts) for s in stats):
        return count_weighted_delta(trimmed, [s.freq[: t.shape[0]] for s, t in zip(stats, trimmed)], weights)
    return weighted_sum(trimmed, weights) / weights.sum()
