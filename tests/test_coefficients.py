"""Coefficient selection: the gain-retained formula by hand, golden-section search on known functions."""

from __future__ import annotations

import math

import pytest

from mergecli.methods.coefficients import gain_retained, golden_max, mean_gain


def test_gain_retained_by_hand():
    # base log-PPL 3.0, specialist 2.0: a merge at 2.25 recovers 0.75 of the 1.0 nat gap
    assert gain_retained(3.0, 2.0, 2.25) == pytest.approx(0.75)
    assert gain_retained(3.0, 2.0, 3.5) == pytest.approx(-0.5)  # worse than the base
    assert mean_gain([3.0, 1.0], [2.0, 0.5], [2.25, 0.5]) == pytest.approx((0.75 + 1.0) / 2)
    with pytest.raises(ValueError):
        gain_retained(2.0, 2.0, 1.0)


def test_golden_max_finds_interior_and_edge_maxima():
    x, fx, seen = golden_max(lambda t: -(t - 1.3) ** 2, 0.5, 2.0, tol=0.01, max_evals=30)
    assert abs(x - 1.3) < 0.01 and fx == pytest.approx(-((x - 1.3) ** 2))
    x, _, _ = golden_max(lambda t: t, 0.5, 2.0)  # increasing: the upper end
    assert x == 2.0
    calls = []
    golden_max(lambda t: calls.append(t) or -abs(t - 1), 0.5, 2.0, tol=1e-9, max_evals=8)
    assert len(calls) <= 8 and len(set(calls)) == len(calls)  # budget kept, no point evaluated twice
    assert math.isfinite(golden_max(math.sin, 0.0, 3.0)[1])
