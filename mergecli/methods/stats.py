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
    """G = H / tokens, kept as the stored H and formed in fp64 only while a method uses it: at 7B
    widths one fp64 G is 11008^2 * 8 B = 970 MB, and the merge keeps a few groups per model."""

    h: torch.Tensor  # sum of x x^T over the group's inputs (or G itself, with tokens = 1), in x in
    damp: float = 0.01
    tokens: int = 1
    _cache: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def gram(self) -> torch.Tensor:
        """A new fp64 G on every call (its user may overwrite it), made with one allocation."""
        return self.h.to(torch.float64, copy=True).div_(self.tokens)

    @property
    def hinv_diag(self) -> torch.Tensor:
        if "hinv" not in self._cache:
            self._cache["hinv"] = inverse_diagonal(self.gram, self.damp)
        return self._cache["hinv"]

    @property
    def diag(self) -> torch.Tensor:
        return torch.diagonal(self.h).to(torch.float64) / self.tokens


@dataclass(frozen=True)
class TokenCounts:
    """Statistics of an embedding lookup: how often each token id was an input position of the
    calibration windows, over the number of such positions (the diagonal of its Gram, G = H / n)."""

    freq: torch.Tensor  # length = embedding rows
