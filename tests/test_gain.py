"""Gain retained and its jackknife SE against independent references: the textbook SE of a mean, a
leave-one-out loop over raw windows written out, and hand-computed gains."""

import math
import random
import statistics

import pytest

from mergecli.quality.gain import difference_with_se, gain_retained, gain_with_se, log_ratio_with_se, mean_gain


def test_gain_retained_by_hand():
    # base 3.0, specialist 2.0: the merge at 2.25 keeps 3/4 of the specialist's gain
    assert gain_retained(3.0, 2.0, 2.25) == pytest.approx(0.75)
    assert gain_retained(3.0, 2.0, 3.5) == pytest.approx(-0.5)  # worse than the base
    with pytest.raises(ValueError, match="gain undefined"):
        gain_retained(2.0, 2.0, 1.0)
    # the mean over domains, from windows: (3 - 2.25) / (3 - 2) on one, (1 - 0.5) / (1 - 0.5) on the other
    one = {"a": [(3.0, 1)], "b": [(2.0, 2)]}
    assert mean_gain(one, {"a": [(2.0, 1)], "b": [(1.0, 2)]}, {"a": [(2.25, 1)], "b": [(1.0, 2)]}) == \
        pytest.approx((0.75 + 1.0) / 2)


def _windows(rng, n, level, tokens=None):
    return [(level * (t := tokens or rng.randint(50, 127)) * (1 + 0.2 * rng.random()), t) for _ in range(n)]


def test_se_of_a_log_ratio_with_equal_windows_is_the_textbook_se_of_a_mean():
    rng = random.Random(0)
    a, b = _windows(rng, 40, 2.0, tokens=127), _windows(rng, 40, 2.1, tokens=127)
    value, se = log_ratio_with_se(a, b)
    per_window = [(x[0] - y[0]) / 127 for x, y in zip(a, b)]
    assert value == pytest.approx(statistics.fmean(per_window), rel=1e-12)
    assert se == pytest.approx(statistics.stdev(per_window) / math.sqrt(len(per_window)), rel=1e-9)
    assert log_ratio_with_se(a, a) == (0.0, 0.0)


def _loo_reference(fn, sets):
    """The jackknife written out: drop window k of dataset d from every model, recompute from raw
    windows (no running totals)."""
    var = 0.0
    for d, models in sets.items():
        n = len(models[0])
        loo = [fn({**sets, d: [m[:k] + m[k + 1:] for m in models]}) for k in range(n)]
        mean = sum(loo) / n
        var += (n - 1) / n * sum((v - mean) ** 2 for v in loo)
    return fn(sets), math.sqrt(var)


def _gain_raw(sets, i):
    """Mean gain of model i; each dataset's models are [base, specialist, ...]."""
    gains = []
    for models in sets.values():
        nll = [sum(s for s, _ in m) / sum(t for _, t in m) for m in models]
        gains.append((nll[0] - nll[i]) / (nll[0] - nll[1]))
    return sum(gains) / len(gains)


def test_gain_and_paired_difference_match_a_leave_one_out_loop_over_raw_windows():
    rng = random.Random(1)
    domains = {"code": (2.5, 2.0), "verse": (4.0, 3.2), "sums": (1.5, 1.0)}
    base = {d: _windows(rng, 24, b) for d, (b, _) in domains.items()}
    spec = {d: [(w[0] * sp / b, w[1]) for w in base[d]] for d, (b, sp) in domains.items()}
    noise = {d: [rng.gauss(0, 0.05) for _ in base[d]] for d in domains}
    merge = {d: [(w[0] * (1 - 0.15 + noise[d][k]) * 0.9 + 0.1 * s[0], w[1]) for k, (w, s) in
                 enumerate(zip(base[d], spec[d]))] for d in domains}
    other = {d: [(m[0] * (1 + rng.gauss(0, 0.01)), m[1]) for m in merge[d]] for d in domains}
    sets = {d: [base[d], spec[d], merge[d], other[d]] for d in domains}
    value, se = gain_with_se(base, spec, merge)
    ref_value, ref_se = _loo_reference(lambda s: _gain_raw(s, 2), sets)
    assert value == pytest.approx(ref_value, rel=1e-12) and se == pytest.approx(ref_se, rel=1e-9)
    diff, diff_se = difference_with_se(base, spec, merge, other)
    ref_diff, ref_diff_se = _loo_reference(lambda s: _gain_raw(s, 2) - _gain_raw(s, 3), sets)
    assert diff == pytest.approx(ref_diff, rel=1e-9) and diff_se == pytest.approx(ref_diff_se, rel=1e-9)
    # pairing: the difference is far better determined than either gain alone
    assert diff_se < se / 3
    assert difference_with_se(base, spec, merge, merge) == (0.0, 0.0)


def test_models_on_different_windows_are_refused():
    rng = random.Random(2)
    base = {"code": _windows(rng, 5, 2.5)}
    with pytest.raises(ValueError, match="different numbers of windows"):
        gain_with_se(base, {"code": _windows(rng, 5, 2.0)}, {"code": _windows(rng, 4, 2.2)})
