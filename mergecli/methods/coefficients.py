"""Choosing a merge's scale (lambda) or RegMean's alpha from calibration data, and the quality score.

Pure functions: the caller supplies the loss of a candidate merge on held-out *calibration* windows
(never evaluation text) as a callable, so nothing here loads a model.

Gain retained (DESIGN §12) of a merge on domain d, from mean next-token NLLs (= log perplexities):
    g_d = (L_base,d - L_merge,d) / (L_base,d - L_specialist_d,d)
1 means the merge is as good on d as the model fine-tuned on d; 0 means no better than the base.
The mean over domains is what `lambda: auto` maximises, on calibration windows.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence


def gain_retained(base: float, specialist: float, merged: float) -> float:
    """(L_base - L_merge) / (L_base - L_specialist) for mean NLLs; raises if the specialist is not
    better than the base (the score is undefined there)."""
    if not base > specialist:
        raise ValueError(f"specialist NLL {specialist:.4f} is not below the base's {base:.4f}: gain undefined")
    return (base - merged) / (base - specialist)


def mean_gain(base: Sequence[float], specialist: Sequence[float], merged: Sequence[float]) -> float:
    """Mean over domains of `gain_retained` (one entry per domain in each sequence)."""
    gains = [gain_retained(b, s, m) for b, s, m in zip(base, specialist, merged)]
    return sum(gains) / len(gains)


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
