"""Scores: how much each entry of a task vector matters.

Weights are oriented out x in. A score with selection "rank" orders entries (TIES keeps the exact
top-k; DARE turns ranks into keep-probabilities); "bernoulli" keeps each entry independently with
probability density (plain DARE). Scores with `needs_stats` use the layer's calibration
statistics; on tensors without them (embeddings, norms, biases) the merge falls back to magnitude
and says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch

from .hessian_math import obs_saliency, wanda_score
from .stats import LayerStats

ScoreFn = Callable[[torch.Tensor, LayerStats | None], torch.Tensor]


@dataclass(frozen=True)
class Score:
    name: str
    selection: Literal["rank", "bernoulli"]
    fn: ScoreFn | None = None
    needs_stats: bool = False
    doc: str = ""


def magnitude(tau: torch.Tensor, stats: LayerStats | None = None) -> torch.Tensor:
    """|tau_ij|: the data-free importance TIES uses."""
    return tau.abs()


def sparsegpt(tau: torch.Tensor, stats: LayerStats | None) -> torch.Tensor:
    """tau_ij^2 / [H^-1]_jj with H the damped, token-normalised Hessian of the layer's inputs."""
    assert stats is not None
    return obs_saliency(tau, stats.hinv_diag)


def wanda(tau: torch.Tensor, stats: LayerStats | None) -> torch.Tensor:
    """|tau_ij| * sqrt(H_jj / n)."""
    assert stats is not None
    return wanda_score(tau, stats.diag)


SCORES: dict[str, Score] = {
    "magnitude": Score("magnitude", "rank", magnitude, doc="|tau|"),
    "random": Score("random", "bernoulli", doc="keep each entry with probability density (DARE)"),
    "sparsegpt": Score("sparsegpt", "rank", sparsegpt, needs_stats=True, doc="tau^2 / [H^-1]_jj (OBS saliency)"),
    "wanda": Score("wanda", "rank", wanda, needs_stats=True, doc="|tau| * sqrt(H_jj / n)"),
}
