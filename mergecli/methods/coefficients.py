"""Choosing a merge coefficient: a budgeted golden-section search (pure; the caller scores each
candidate, see `search.py` for `lambda: auto`)."""

from __future__ import annotations

import math
from typing import Callable


_INV_PHI = (math.sqrt(5) - 1) / 2


def golden_max(f: Callable[[float], float], lo: float, hi: float, tol: float = 0.05,
               max_evals: int = 12) -> tuple[float, float, dict[float, float]]:
    """Maximise a unimodal f on [lo, hi] by golden-section search.

    Returns (argmax, max, every evaluated point -> value). Each evaluation is a forward pass of a
    merged model over calibration windows, so the budget is explicit: at most `max_evals` calls
    (golden section shrinks the bracket by 0.618 per call; tol 0.05 on [0.5, 2] needs 8).
    Endpoints are evaluated too, so a maximum at the edge of the bracket is found, not missed.
    """
    seen: dict[float, float] = {}

    def value(x: float) -> float:
        if x not in seen:
            seen[x] = f(x)
        return seen[x]

    a, b = lo, hi
    c = b - _INV_PHI * (b - a)
    d = a + _INV_PHI * (b - a)
    fc, fd = value(c), value(d)
    while b - a > tol and len(seen) < max_evals - 2:
        if fc >= fd:
            b, d, fd = d, c, fc
            c = b - _INV_PHI * (b - a)
            fc = value(c)
        else:
            a, c, fc = c, d, fd
            d = a + _INV_PHI * (b - a)
            fd = value(d)
    value(lo)
    value(hi)
    best = max(seen, key=lambda x: seen[x])
    return best, seen[best], seen
