"""Per-layer calibration statistics handed to scores and methods, with derived values computed once.

One `LayerStats` exists per (model, input group): q/k/v share one, so the O(d^3) inverse is
computed once for the three of them.
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
