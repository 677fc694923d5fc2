"""Per-layer calibration statistics handed to scores and methods, with derived values computed once.

One `LayerStats` exists per (model, input group): q/k/v share one, so the O(d^3) inverse is
computed once for the three of them. An embedding lookup gets `TokenCounts` instead: its input is
a one-hot token, so its Gram is the diagonal of the token frequencies and a V x V matrix is never
formed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .hessian_math import inverse_diagonal


@dataclass
class LayerStats:
    gram: torch.Tensor  # G = H / n_tokens, in x in
    damp: float = 0.01
    _cache: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def hinv_diag(self) -> torch.Tensor:
        if "hinv" not in self._cache:
            self._cache["hinv"] = inverse_diagonal(self.gram, self.damp)
        return self._cache["hinv"]

    @property
    def diag(self) -> torch.Tensor:
        return torch.diagonal(self.gram).to(torch.float64)


@dataclass(frozen=True)
class TokenCounts:
    """Statistics of an embedding lookup: how often each token id was an input position of the
    calibration windows, over the number of such positions (the diagonal of its Gram, G = H / n)."""

    freq: torch.Tensor  # length = embedding rows
