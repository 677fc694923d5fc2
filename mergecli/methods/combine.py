"""How trimmed task vectors become one delta: weighted sum, or TIES' sign election + disjoint mean.

Inputs are stacked along dim 0 (one slice per model); `weights` has one entry per model.
"""

from __future__ import annotations

import torch


def _per_model(weights: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return weights.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def weighted_sum(trimmed: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Task arithmetic / DARE-linear: sum_i w_i t_i."""
    return (trimmed * _per_model(weights, trimmed)).sum(dim=0)


def elect_sign(trimmed: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """TIES election: gamma = sign(sum_i w_i t_i), 0 where the sum is exactly 0."""
    return torch.sign(weighted_sum(trimmed, weights))


def disjoint_mean(trimmed: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """TIES merge: weighted mean over the models whose non-zero entry agrees with the elected sign.

    delta = sum_i w_i t_i [sign t_i = gamma] / sum_i w_i [sign t_i = gamma, t_i != 0]; 0 where no
    model agrees (including gamma = 0, since sign(t_i) of a kept entry is never 0).
    """
    w = _per_model(weights, trimmed)
    agree = torch.sign(trimmed) == elect_sign(trimmed, weights)
    agree &= trimmed != 0
    numerator = (trimmed * w * agree).sum(dim=0)
    denominator = (w * agree).sum(dim=0)
    return torch.where(denominator != 0, numerator / torch.where(denominator != 0, denominator, 1), 0)
