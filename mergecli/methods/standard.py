"""The classic merge methods: task arithmetic, trimmed linear, TIES, DARE, RegMean.

Each is one registered combine function over trimmed task vectors (the pipeline trims first, as
its declaration says) returning the merged delta; the math itself lives in `combine.py` and
`hessian_math.py`.
"""

from __future__ import annotations

from .combine import disjoint_mean, weighted_sum
from .hessian_math import regmean_delta
from .table import (ALPHA, DAMP, DENSITY, LAMBDA, SCORE, TOPK, TRIM_DARE, TRIM_TOPK, compensate_needs_sparsegpt,
                    register_method, sign_election_needs_positive_weights)


@register_method("task_arithmetic", params=(LAMBDA,))
def task_arithmetic(trimmed, weights, **_):
    """theta_base + lambda * sum_i w_i tau_i (whole task vectors)."""
    return weighted_sum(trimmed, weights)


@register_method("linear", params=(*TRIM_TOPK, LAMBDA), trim="topk", check=compensate_needs_sparsegpt)
def linear(trimmed, weights, **_):
    """Trimmed task arithmetic: keep the top-k by score, then sum_i w_i t_i (no rescale)."""
    return weighted_sum(trimmed, weights)


@register_method("ties", params=(*TRIM_TOPK, LAMBDA), trim="topk", check=sign_election_needs_positive_weights)
def ties(trimmed, weights, **_):
    """Trim to density, elect signs, disjoint weighted mean (Yadav et al. 2023)."""
    return disjoint_mean(trimmed, weights)


@register_method("dare_linear", params=(*TRIM_DARE, LAMBDA), trim="dare")
def dare_linear(trimmed, weights, **_):
    """Drop, rescale survivors by 1/keep-probability, weighted sum (Yu et al. 2023)."""
    return weighted_sum(trimmed, weights)


@register_method("dare_ties", params=(*TRIM_DARE, LAMBDA), trim="dare", check=sign_election_needs_positive_weights)
def dare_ties(trimmed, weights, **_):
    """Drop and rescale as DARE, then TIES' sign election and disjoint mean."""
    return disjoint_mean(trimmed, weights)


@register_method("regmean", params=(ALPHA, DENSITY.with_default(1.0), SCORE, TOPK, DAMP, LAMBDA), trim="topk",
                 needs_stats=True, elementwise=False)
def regmean(trimmed, weights, *, params, stats, **_):
    """Linear layers: (sum w_i W_i G~_i)(sum w_i G~_i)^-1 (Jin et al. 2023); other tensors: weighted mean."""
    if all(s is not None for s in stats):
        return regmean_delta(trimmed, [s.gram for s in stats], weights, params["alpha"])
    return weighted_sum(trimmed, weights) / weights.sum()
