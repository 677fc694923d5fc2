"""Gain retained, and its standard error over evaluation windows (the quality score of a merge).

gain retained of a model on domain d, from mean next-token NLLs L (= log perplexities) on the same
held-out windows:
    g_d = (L_base,d - L_model,d) / (L_base,d - L_specialist_d,d)
1 means the model is as good on d as the fine-tune trained on d; 0, no better than the base. The
score of a merge is the mean over domains. `compare`, `lambda: auto` and the quality benchmark all
compute it here, from the (NLL sum, tokens) pairs the eval stage stores per window.

Standard error: leave-one-document-out (grouped) jackknife. Every model is evaluated on exactly
the same windows, so removing a group of windows removes it for the base, the specialists and the
merges alike: the SE of one model's gain includes the noise of its base and specialist
references, and the SE of a *difference* between two merges is paired (a hard window moves both,
and cancels). The windows of one document are not independent samples of the text (a long file
gives several consecutive windows that share its style and vocabulary), so they are left out
together: the unit of the jackknife is the document a window starts in (`clusters`); without
clusters every window is its own (as before: SEs come out too small where documents span several
windows). Datasets are independent samples, so their variances add.

Pure Python, no torch: the report imports it.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

Windows = Sequence[tuple[float, int]]  # per window: (NLL sum, predicted tokens)


def gain_retained(base: float, specialist: float, merged: float) -> float:
    """(L_base - L_model) / (L_base - L_specialist) for mean NLLs; ValueError if the specialist is
    not better than the base (the score is undefined there)."""
    if not base > specialist:
        raise ValueError(f"specialist NLL {specialist:.4f} is not below the base's {base:.4f}: gain undefined")
    return (base - merged) / (base - specialist)


def mean_nll(windows: Windows) -> float:
    """Token-weighted mean NLL of windows (the log of their perplexity)."""
    return sum(s for s, _ in windows) / sum(n for _, n in windows)


Totals = tuple[float, int]  # (NLL sum, tokens) of a set of windows: mean NLL = sum / tokens


def _gain_of(totals: Mapping[str, Sequence[Totals]], i: int) -> float:
    """Mean gain of model i from per-domain totals [base, specialist, model 1, model 2, ...].

    Not `gain_retained`: a leave-one-out sample may put a specialist that barely beats the base
    level with it, and its wild ratio is the honest sign that the gain is ill-determined there (a
    large SE), not an error. The full-data value is checked by the callers."""
    gains = []
    for t in totals.values():
        base, specialist, model = (s / n for s, n in (t[0], t[1], t[i]))
        gains.append((base - model) / (base - specialist) if base != specialist else math.nan)
    return sum(gains) / len(gains)


def _checked(base: Mapping[str, Windows], specialists: Mapping[str, Windows]) -> None:
    for d, windows in specialists.items():
        gain_retained(mean_nll(base[d]), mean_nll(windows), 0.0)  # raises where the gain is undefined


def _totals(windows: Windows) -> Totals:
    return sum(s for s, _ in windows), sum(n for _, n in windows)


def mean_gain(base: Mapping[str, Windows], specialists: Mapping[str, Windows], model: Mapping[str, Windows]) -> float:
    """Mean over the specialists' domains of `gain_retained` (each domain's windows by name)."""
    _checked(base, specialists)
    return _gain_of({d: [_totals(base[d]), _totals(specialists[d]), _totals(model[d])] for d in specialists}, 2)


def jackknife(fn: Callable[[Mapping[str, Sequence[Totals]]], float], sets: Mapping[str, Sequence[Windows]],
              clusters: Mapping[str, Sequence[int]] | None = None) -> tuple[float, float]:
    """fn of every model's totals per dataset, and its leave-one-cluster-out jackknife SE.

    `sets[d]` holds, per model, its windows of dataset d (all models the same windows, in the same
    order); `fn` receives each model's (NLL sum, tokens) over them. `clusters[d][k]` is the group
    of window k (the document it starts in; default: each window its own); a group of d is left out
    of every model at once (paired), and variances of independent datasets add:
    var = sum_d (G_d - 1)/G_d * sum_g (f_(d,-g) - mean_g f_(d,-g))^2 over d's G_d groups. Each
    leave-one-out value costs one call of fn on totals, so the whole is linear in the windows.
    """
    totals = {d: [_totals(m) for m in models] for d, models in sets.items()}
    value = fn(totals)
    var = 0.0
    for d, models in sets.items():
        n = len(models[0])
        if any(len(m) != n for m in models):
            raise ValueError(f"{d}: the models were evaluated on different numbers of windows")
        labels = list(clusters[d]) if clusters and d in clusters else list(range(n))
        if len(labels) != n:
            raise ValueError(f"{d}: {len(labels)} cluster labels for {n} windows")
        groups: dict[int, list[int]] = {}
        for k, label in enumerate(labels):
            groups.setdefault(label, []).append(k)
        if len(groups) < 2:
            return value, math.nan
        loo = []
        for members in groups.values():
            left = [(s - sum(m[k][0] for k in members), t - sum(m[k][1] for k in members))
                    for (s, t), m in zip(totals[d], models)]
            loo.append(fn({**totals, d: left}))
        mean = sum(loo) / len(loo)
        var += (len(loo) - 1) / len(loo) * sum((v - mean) ** 2 for v in loo)
    return value, math.sqrt(var)


def gain_with_se(base: Mapping[str, Windows], specialists: Mapping[str, Windows], model: Mapping[str, Windows],
                 clusters: Mapping[str, Sequence[int]] | None = None) -> tuple[float, float]:
    """Mean over the specialists' domains of `gain_retained`, and its jackknife SE (the noise of
    the base and specialist references included; windows grouped by `clusters`)."""
    _checked(base, specialists)
    return jackknife(lambda t: _gain_of(t, 2), {d: [base[d], specialists[d], model[d]] for d in specialists}, clusters)


def difference_with_se(base: Mapping[str, Windows], specialists: Mapping[str, Windows],
                       model: Mapping[str, Windows], reference: Mapping[str, Windows],
                       clusters: Mapping[str, Sequence[int]] | None = None) -> tuple[float, float]:
    """Mean gain of `model` minus that of `reference`, and its paired jackknife SE."""
    _checked(base, specialists)
    return jackknife(lambda t: _gain_of(t, 2) - _gain_of(t, 3),
                     {d: [base[d], specialists[d], model[d], reference[d]] for d in specialists}, clusters)


def log_ratio_with_se(model: Windows, reference: Windows, clusters: Sequence[int] | None = None) -> tuple[float, float]:
    """log PPL(model) - log PPL(reference) on one dataset's windows, with its paired SE (how much
    more a merge forgets general text than another, told from window noise)."""
    return jackknife(lambda t: t["d"][0][0] / t["d"][0][1] - t["d"][1][0] / t["d"][1][1], {"d": [model, reference]},
                     None if clusters is None else {"d": clusters})
