"""Trim rules beyond top-k and plain Bernoulli: DELLA's magnitude-ranked keep-probabilities,
Model Breadcrumbs' band of mid-sized entries, and mergekit's norm-matching rescale.

Pure tensor functions, oriented out x in like the rest of `methods/` (rows are output features).

- DELLA (Deep et al. 2024, arXiv:2406.11617; mergekit `della_magprune`): within each row, the
  entry of rank r (0 = smallest |tau|, n - 1 = largest) is kept with probability
  p = (d - eps) + 2 eps r / (n - 1): from d - eps for the smallest to d + eps for the largest,
  mean exactly d. mergekit requires 0 < d - eps and d + eps < 1. Rows are independent, so a
  tensor can be processed a chunk of whole rows at a time; draws come from the entry-addressed
  stream of `sparsify.RandomStream`, so masks do not depend on chunking or order.
- Breadcrumbs (Davari & Belilovsky 2023, arXiv:2312.06795; mergekit `magnitude_outliers`): per
  tensor, drop the `gamma` fraction of largest |tau| and as many of the smallest as leaves the
  `density` fraction: keep = top-(k + drop_top) minus top-(drop_top), exact counts with
  `sparsify`'s tie rule (the first in flat order wins), found once per tensor and applied to
  any run of consecutive entries, like `TopK`.
- Rescale: the DARE paper divides survivors by their keep-probability (`sparsify`, unbiased per
  entry). mergekit 0.1.5 instead multiplies the trimmed tensor by ||tau||_1 / ||trimmed||_1 (its
  `rescale: true` for dare_*, della*, and any method that sets it): one factor per tensor.

The methods these trims define are registered at the end: the pipeline trims (`plan_trim`), the
combine step is a sign election (`della`, `breadcrumbs_ties`) or a weighted sum.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .consensus import added, elected
from .sparsify import RandomStream, TopK, keep_count, topk_threshold
from .table import (DAMP, DENSITY, LAMBDA, NORMALIZE, RANKING, RESCALE_DRAWN, RESCALE_KEPT, SEED, Param,
                    normalized_mean_bounded, register_method, sign_election_needs_positive_weights)


def normalized_ranks(scores: torch.Tensor, per_row: bool = True) -> torch.Tensor:
    """Rank of each entry within its row (or the whole tensor) scaled to [0, 1], float64.

    0 is the lowest score, 1 the highest; equal scores are ordered by position (a stable sort),
    so the result is deterministic. A row of one entry gets 0.5 (mergekit divides 0 by 0 there).
    """
    flat = scores.reshape(scores.shape[0], -1) if per_row and scores.dim() >= 2 else scores.reshape(1, -1)
    n = flat.shape[1]
    order = flat.argsort(dim=1, stable=True)
    ranks = torch.empty(flat.shape, dtype=torch.float64, device=flat.device)
    ranks.scatter_(1, order, torch.arange(n, dtype=torch.float64, device=flat.device).expand_as(flat).contiguous())
    if n == 1:
        return ranks.fill_(0.5).reshape(scores.shape)
    return ranks.div_(n - 1).reshape(scores.shape)


def della_probabilities(scores: torch.Tensor, density: float, epsilon: float, per_row: bool = True) -> torch.Tensor:
    """Keep-probability of each entry: (d - eps) + 2 eps * rank in [0, 1] (float64).

    d >= 1 keeps everything and d <= 0 nothing (mergekit returns the tensor unchanged / zero there
    before checking eps); otherwise d - eps must be > 0 and d + eps < 1.
    """
    if density >= 1:
        return torch.ones(scores.shape, dtype=torch.float64, device=scores.device)
    if density <= 0:
        return torch.zeros(scores.shape, dtype=torch.float64, device=scores.device)
    if not (density - epsilon > 0 and density + epsilon < 1):
        raise ValueError(f"della: density - epsilon and density + epsilon must lie in (0, 1); "
                         f"got density {density}, epsilon {epsilon}")
    return normalized_ranks(scores, per_row).mul_(2 * epsilon).add_(density - epsilon)


def sample_mask(probabilities: torch.Tensor, stream: RandomStream, start: int = 0) -> torch.Tensor:
    """Keep each entry with its own probability: u_e < p_e with u_e the e-th uniform of the
    stream (entry `start` of the tensor is the chunk's first)."""
    return stream.uniform(probabilities.shape, start).to(probabilities.device) < probabilities


def l1_factor(tau_l1: float, trimmed_l1: float, eps: float = 1e-7) -> float:
    """mergekit's rescale: ||tau||_1 / ||trimmed||_1, or 1 when either norm is below `eps`.

    Takes the two sums rather than the tensors so a chunked merge can add them up first.
    """
    if tau_l1 < eps or trimmed_l1 < eps:
        return 1.0
    return tau_l1 / trimmed_l1


def l1_rescale(tau: torch.Tensor, trimmed: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """`trimmed` (a new tensor) scaled so its L1 norm equals tau's (mergekit `RescaleNorm.l1`)."""
    return trimmed * l1_factor(float(tau.abs().sum()), float(trimmed.abs().sum()), eps)


def breadcrumbs_counts(n: int, density: float, gamma: float) -> tuple[int, int]:
    """(entries kept, largest entries dropped) out of n.

    k = round(d n), at least 1 (mergecli's rule; mergekit keeps int(d n), possibly 0); the top
    round(gamma n) are dropped, fewer when that would leave less than k entries (then no small
    entry is dropped), so the kept count is always k.
    """
    keep = keep_count(n, density)
    return keep, min(round(gamma * n), n - keep)


@dataclass
class Band:
    """Keep the entries ranked between `drop_top` and `drop_top + keep` from the top, applied to
    consecutive runs of the tensor's entries in flat order (the two TopK count down their ties)."""

    outer: TopK
    inner: TopK | None

    def mask(self, scores: torch.Tensor) -> torch.Tensor:
        keep = self.outer.mask(scores)
        if self.inner is not None:
            keep &= ~self.inner.mask(scores)
        return keep


def breadcrumbs_band(flat_scores: torch.Tensor, density: float, gamma: float) -> Band:
    """The Breadcrumbs selection of a whole tensor's scores (flat); apply with `Band.mask`."""
    keep, drop_top = breadcrumbs_counts(flat_scores.numel(), density, gamma)
    outer = topk_threshold(flat_scores, keep + drop_top)
    return Band(outer, topk_threshold(flat_scores, drop_top) if drop_top > 0 else None)


def breadcrumbs_mask(scores: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Boolean mask of the entries Breadcrumbs keeps, for one whole tensor."""
    flat = scores.reshape(-1)
    return breadcrumbs_band(flat, density, gamma).mask(flat).reshape(scores.shape)


# -- methods ---------------------------------------------------------------------------------------
EPSILON = Param("epsilon", float, 0.15, "della: keep-probabilities run from density - epsilon (smallest) to "
                "density + epsilon (largest)", low=0.0, high=0.5, per_model=True, schedulable=True)
GAMMA = Param("gamma", float, 0.01, "breadcrumbs: fraction of the largest entries dropped", low=0.0, high=1.0,
              per_model=True, schedulable=True)
TRIM_DELLA = (DENSITY, EPSILON, RANKING, SEED, DAMP, RESCALE_DRAWN)
TRIM_BAND = (DENSITY, GAMMA, RANKING, DAMP, RESCALE_KEPT)


def della_bounds(params, weights) -> None:
    """DELLA's probabilities must stay inside (0, 1): density - epsilon > 0 and density + epsilon < 1."""
    d, eps = params["density"], params["epsilon"]
    if d < 1 and not (d - eps > 0 and d + eps < 1):
        raise ValueError(f"epsilon: density {d:g} - epsilon {eps:g} must be > 0 and density + epsilon < 1")


def della_linear_rules(params, weights) -> None:
    della_bounds(params, weights)
    normalized_mean_bounded(params, weights)


def della_ties_rules(params, weights) -> None:
    della_bounds(params, weights)
    sign_election_needs_positive_weights(params, weights)


@register_method("della", params=(*TRIM_DELLA, LAMBDA, NORMALIZE.with_default(True)), trim="della",
                 check=della_ties_rules)
def della(trimmed, weights, *, params, **_):
    """Drop by magnitude-ranked keep-probabilities per row, rescale, TIES' sign election (Deep et al. 2024)."""
    return elected(trimmed, weights, params["normalize"])


@register_method("della_linear", params=(*TRIM_DELLA, LAMBDA, NORMALIZE), trim="della", additive=True,
                 check=della_linear_rules)
def della_linear(trimmed, weights, *, params, **_):
    """DELLA's drop and rescale, then the weighted sum."""
    return added(trimmed, weights, params["normalize"])


@register_method("breadcrumbs", params=(*TRIM_BAND, LAMBDA, NORMALIZE), trim="breadcrumbs", additive=True,
                 check=normalized_mean_bounded)
def breadcrumbs(trimmed, weights, *, params, **_):
    """Keep a band: drop the gamma fraction of largest and the smallest entries (Davari & Belilovsky 2023), sum."""
    return added(trimmed, weights, params["normalize"])


@register_method("breadcrumbs_ties", params=(*TRIM_BAND, LAMBDA, NORMALIZE.with_default(True)), trim="breadcrumbs",
                 check=sign_election_needs_positive_weights)
def breadcrumbs_ties(trimmed, weights, *, params, **_):
    """Breadcrumbs' band, then TIES' sign election."""
    return elected(trimmed, weights, params["normalize"])
