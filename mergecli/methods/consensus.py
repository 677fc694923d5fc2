"""Combining trimmed task vectors with or without dividing by the weights (`normalize`).

`combine.disjoint_mean` is TIES with `normalize: true` (the weighted mean of the agreeing
entries); mergekit's dare_ties, breadcrumbs_ties (and any ties config that says
`normalize: false`) instead *sum* the agreeing weighted entries. Without an election,
`normalize: true` divides the weighted sum by the sum of the weights. `elected` and `added` are
the two families' combine steps, as the methods call them.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .combine import disjoint_mean, elect_sign, weighted_sum


def disjoint_sum(trimmed: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """sum_i w_i t_i [sign t_i = gamma], gamma = sign(sum_i w_i t_i); 0 where gamma = 0.

    Same election as `disjoint_mean` (so the two differ only by the division). Two edge cases
    differ from mergekit, both measure-zero for real task vectors: mergekit elects + where the
    weighted sum is exactly 0 (we keep 0), and compares the sign of w_i t_i rather than t_i
    (they differ for negative weights only).
    """
    gamma = elect_sign(trimmed, weights)
    total = torch.zeros_like(gamma)
    for t, w in zip(trimmed, weights.tolist()):
        total.add_(torch.mul(t, gamma).clamp_(min=0.0), alpha=w)  # |t_i| where t_i agrees, else 0
    return total.mul_(gamma)


def weighted_mean(trimmed: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """sum_i w_i t_i / sum_i w_i; weights summing to less than 1e-8 in magnitude are not divided
    by (mergekit's guard for task_arithmetic / dare_linear / breadcrumbs with `normalize: true`)."""
    total = float(weights.sum())
    merged = weighted_sum(trimmed, weights)
    return merged if abs(total) < 1e-8 else merged.div_(total)


def elected(trimmed: Sequence[torch.Tensor], weights: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Sign election, then the agreeing entries' weighted mean (normalize) or weighted sum."""
    return (disjoint_mean if normalize else disjoint_sum)(trimmed, weights)


def added(trimmed: Sequence[torch.Tensor], weights: torch.Tensor, normalize: bool) -> torch.Tensor:
    """The weighted sum, divided by the weights' sum with normalize."""
    return (weighted_mean if normalize else weighted_sum)(trimmed, weights)
