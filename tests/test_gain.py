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


def _grouped_reference(fn, sets, clusters):
    """The grouped jackknife written out: drop every window of one document from every model at
    once, recompute from raw windows; var = (G - 1)/G sum_g (f_-g - mean)^2 per dataset."""
    var = 0.0
    for d, models in sets.items():
        groups = sorted(set(clusters[d]))
        loo = [fn({**sets, d: [[w for w, c in zip(m, clusters[d]) if c != g] for m in models]}) for g in groups]
        mean = sum(loo) / len(loo)
        var += (len(loo) - 1) / len(loo) * sum((v - mean) ** 2 for v in loo)
    return fn(sets), math.sqrt(var)


def test_windows_of_one_document_are_left_out_together():
    """Eight documents of four windows each, every window of a document alike (a hard document is
    hard in all its windows): the per-window jackknife treats 32 windows as independent and its
    SE comes out too small; left out by document, the SE is the grouped jackknife's."""
    rng = random.Random(3)
    domains = {"code": (2.5, 2.0), "verse": (4.0, 3.2)}
    clusters = {d: [k // 4 for k in range(32)] for d in domains}
    level = {d: [1 + 0.3 * rng.gauss(0, 1) for _ in range(8)] for d in domains}  # a document's difficulty
    base = {d: [(b * level[d][c] * 100 * (1 + 0.01 * rng.random()), 100) for c in clusters[d]]
            for d, (b, _) in domains.items()}
    spec = {d: [(w[0] * sp / b, w[1]) for w in base[d]] for d, (b, sp) in domains.items()}
    shift = {d: [0.2 * rng.gauss(0, 1) for _ in range(8)] for d in domains}  # how the merge fares per document
    merge = {d: [(w[0] * (0.9 + 0.05 * shift[d][c]) + 0.1 * s[0] * 0.9, w[1])
                 for w, s, c in zip(base[d], spec[d], clusters[d])] for d in domains}
    sets = {d: [base[d], spec[d], merge[d]] for d in domains}
    value, se = gain_with_se(base, spec, merge, clusters)
    ref_value, ref_se = _grouped_reference(lambda s: _gain_raw(s, 2), sets, clusters)
    assert value == pytest.approx(ref_value, rel=1e-12) and se == pytest.approx(ref_se, rel=1e-9)
    assert se > 1.3 * gain_with_se(base, spec, merge)[1]  # per window: too small
    alone = {d: list(range(32)) for d in domains}  # every window its own document: the old jackknife
    assert gain_with_se(base, spec, merge, alone) == pytest.approx(gain_with_se(base, spec, merge), rel=1e-12)
    with pytest.raises(ValueError, match="cluster labels for 32 windows"):
        gain_with_se(base, spec, merge, {"code": [0, 1], "verse": clusters["verse"]})


def test_each_window_knows_the_document_it_starts_in(models):
    """Packed evaluation windows: a long document gives several consecutive windows, all its own."""
    import torch
    from transformers import AutoTokenizer

    from mergecli.engine.calibration import make_windows

    tok = AutoTokenizer.from_pretrained(models / "base")
    texts = [" ".join(f"{letter}{j}" for j in range(4 + 3 * k)) for k, letter in enumerate("abcdefgh")]
    windows = make_windows(texts, tok, 6, 16, seed=0)
    order = torch.randperm(8, generator=torch.Generator().manual_seed(0)).tolist()
    lengths = [len(tok(texts[i], add_special_tokens=False)["input_ids"]) + 1 for i in order]  # + EOS
    starts = [sum(lengths[:k]) for k in range(8)]
    expected = [order[max(k for k in range(8) if starts[k] <= row * 16)] for row in range(6)]
    assert list(windows.documents) == expected and len(set(expected)) > 1
    padded = make_windows(texts, tok, 3, 16, seed=0, pack=False)
    assert list(padded.documents) == order[:3]
