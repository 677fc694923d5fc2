"""Scores: how much each entry of a task vector matters, and how survivors are then selected.

A score with selection "topk" ranks entries and keeps exactly k of them; "bernoulli" keeps each
entry independently with probability density (DARE). Scores that need calibration statistics
(sparsegpt, wanda) are registered here too when the hessian stage provides them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch

ScoreFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Score:
    name: str
    selection: Literal["topk", "bernoulli"]
    fn: ScoreFn | None = None
    doc: str = ""


def magnitude(tau: torch.Tensor) -> torch.Tensor:
    """|tau_ij|: the data-free importance TIES uses."""
    return tau.abs()


SCORES: dict[str, Score] = {
    "magnitude": Score("magnitude", "topk", magnitude, "|tau|, exact top-k"),
    "random": Score("random", "bernoulli", None, "keep each entry with probability density (DARE)"),
}
