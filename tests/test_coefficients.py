"""Coefficient selection: golden-section search on known functions (maxima inside and at the edge)."""

from __future__ import annotations

import math

import pytest

from mergecli.methods.coefficients import golden_max


def test_golden_max_finds_interior_and_edge_maxima():
    x, fx, seen = golden_max(lambda t: -(t - 1.3) ** 2, 0.5, 2.0, tol=0.01, max_evals=30)
    assert abs(x - 1.3) < 0.01 and fx == pytest.approx(-((x - 1.3) ** 2))
    x, _, _ = golden_max(lambda t: t, 0.5, 2.0)  # increasing: the upper end
    assert x == 2.0
    calls = []
    golden_max(lambda t: calls.append(t) or -abs(t - 1), 0.5, 2.0, tol=1e-9, max_evals=8)
    assert len(calls) <= 8 and len(set(calls)) == len(calls)  # budget kept, no point evaluated twice
    assert math.isfinite(golden_max(math.sin, 0.0, 3.0)[1])
