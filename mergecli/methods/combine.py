"""How trimmed task vectors become one delta: weighted sum, or TIES' sign election + disjoint mean.

`trimmed` is a sequence of same-shaped tensors, one per model (a list, or a tensor stacked along
dim 0); `weights` has one entry per model. Accumulation is in place, one model at a time, so the
working memory is a few tensors, not a few stacks of N.
"""

from __future__ import annotations

from typing import Sequence

import torch


def weighted_sum(trimmed: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """Task arithmetic / DARE-linear: sum_i w_i t_i."""
    total = torch.zeros_like(trimmed[0])
    for t, w in zip(trimmed, weights.tolist()):
        total.add_(t, alpha=w)
    return total


def scaled_sum(base: torch.Tensor, parts: Sequence[tuple[torch.Tensor | None, float | None]]) -> torch.Tensor:
    """base + sum_i f_i part_i in fp32, the parts added in order (a factor of None or 0 adds
    nothing, and its part need not be read): a merge at chosen scales from the parts it was scored
    on. Scoring and writing both call this: the weights written are the sum scored, term by term."""
    total = base.to(torch.float32, copy=True)
    for part, factor in parts:
        if factor:
            total.add_(part, alpha=factor)
    return total


def elect_sign(trimmed: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """TIES election: gamma = sign(sum_i w_i t_i), 0 where the sum is exactly 0."""
    return weighted_sum(trimmed, weights).sign_()


def disjoint_mean(trimmed: Sequence[torch.Tensor], weights: torch.Tensor, block: int = 1 << 22) -> torch.Tensor:
    """TIES merge: weighted mean over the models whose non-zero entry agrees with the elected sign.

    delta = sum_i w_i t_i [sign t_i = gamma] / sum_i w_i [sign t_i = gamma, t_i != 0]; 0 where no
    model agrees (including gamma = 0, since sign(t_i) of a kept entry is never 0). Every entry is
    independent, so large tensors are done in blocks of rows: the temporaries stay at about
    `block` entries instead of several copies of the tensor.
    """
    if trimmed[0].dim() < 2 or trimmed[0].numel() <= block:
        return _disjoint_mean_block(trimmed, weights)
    rows = max(1, block // (trimmed[0].numel() // trimmed[0].shape[0]))
    out = torch.empty_like(trimmed[0])
    for start in range(0, out.shape[0], rows):
        out[start:start + rows] = _disjoint_mean_block([t[start:start + rows] for t in trimmed], weights)
    return out


def _disjoint_mean_block(trimmed: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    # An agreeing entry is t = gamma |t|, so sum_i w_i t_i [agree] = gamma sum_i w_i max(t_i gamma, 0)
    # and [agree] = sign(max(t_i gamma, 0)): one temporary per model instead of three.
    gamma = elect_sign(trimmed, weights)
    numerator = torch.zeros_like(gamma)
    denominator = torch.zeros_like(gamma)
    for t, w in zip(trimmed, weights.tolist()):
        agreeing = torch.mul(t, gamma).clamp_(min=0.0)
        numerator.add_(agreeing, alpha=w)
        denominator.add_(agreeing.sign_(), alpha=w)
    if bool((weights > 0).all()):  # then a non-zero denominator is >= min(w): clamping only touches zeros
        denominator.clamp_(min=float(weights.min()))
    else:
        denominator.masked_fill_(denominator == 0, 1.0)
    return numerator.mul_(gamma).div_(denominator)
