"""RegMean for embeddings, tied embedding/lm_head and norm scales, checked against independent
references: the least-squares problems each closed form claims to solve, written out as stacked
linear systems and handed to torch.linalg.lstsq, and a hand-computed case."""

from __future__ import annotations

import torch

from mergecli.methods.hessian_math import regmean_delta
from mergecli.methods.regmean_extra import (count_weighted_delta, folded_regmean, norm_given_weights, shrink,
                                            tied_embedding_delta)

D = torch.float64


def _one_hot(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(tokens, vocab).to(D)


def test_count_weighted_by_hand():
    # token 0: model A saw it 3 times, model B once -> (3*1 + 1*5) / 4 = 2; token 1: only B -> 7;
    # token 2: nobody -> the plain mean (10 + 20) / 2 = 15
    a = torch.tensor([[1.0], [2.0], [10.0]])
    b = torch.tensor([[5.0], [7.0], [20.0]])
    out = count_weighted_delta([a, b], [torch.tensor([3.0, 0, 0]), torch.tensor([1.0, 2, 0])], torch.ones(2))
    assert torch.allclose(out, torch.tensor([[2.0], [7.0], [15.0]]))


def test_count_weighted_is_regmean_of_a_one_hot_lookup():
    gen = torch.Generator().manual_seed(0)
    vocab, d = 6, 4
    base = torch.randn(vocab, d, generator=gen, dtype=D)
    taus = [torch.randn(vocab, d, generator=gen, dtype=D) for _ in range(3)]
    tokens = [torch.randint(0, vocab - 1, (n,), generator=gen) for n in (20, 9, 14)]  # token vocab-1 unseen
    weights = torch.tensor([1.0, 0.5, 2.0], dtype=D)
    # reference: min_E sum_i w_i / n_i ||X_i E - X_i E_i||^2 with one-hot X_i, stacked for lstsq
    a = torch.cat([(w / len(t)) ** 0.5 * _one_hot(t, vocab) for t, w in zip(tokens, weights)])
    y = torch.cat([(w / len(t)) ** 0.5 * _one_hot(t, vocab) @ (base + tau) for t, tau, w in zip(tokens, taus, weights)])
    seen = a.abs().sum(0) > 0
    ref = torch.linalg.lstsq(a[:, seen], y).solution - base[seen]
    freqs = [torch.bincount(t, minlength=vocab).to(D) / len(t) for t in tokens]
    out = count_weighted_delta(taus, freqs, weights)
    assert torch.allclose(out[seen], ref, atol=1e-10)
    assert torch.allclose(out[~seen], (sum(w * t for t, w in zip(taus, weights)) / weights.sum())[~seen])


def _tied_reference(base, taus, tokens, hidden, weights, beta):
    """lstsq over vec(E) (row-major): lookup rows (X_i kron I_d) and output rows (I_V kron H_i)."""
    vocab, d = base.shape
    rows, targets = [], []
    for tau, t, h, w in zip(taus, tokens, hidden, weights):
        e_i = (base + tau).reshape(-1)
        x = _one_hot(t, vocab)
        look = (beta * w / len(t)) ** 0.5 * torch.kron(x, torch.eye(d, dtype=D))
        out = (w / h.shape[0]) ** 0.5 * torch.kron(torch.eye(vocab, dtype=D), h)
        rows += [look, out]
        targets += [look @ e_i, out @ e_i]
    sol = torch.linalg.lstsq(torch.cat(rows), torch.cat(targets)).solution
    return sol.reshape(vocab, d) - base


def test_tied_embedding_solves_the_stacked_least_squares():
    gen = torch.Generator().manual_seed(1)
    vocab, d = 7, 3
    base = torch.randn(vocab, d, generator=gen, dtype=D)
    taus = [torch.randn(vocab, d, generator=gen, dtype=D) for _ in range(2)]
    tokens = [torch.randint(0, vocab - 2, (n,), generator=gen) for n in (11, 8)]  # two rows never seen
    hidden = [torch.randn(n, d, generator=gen, dtype=D) for n in (11, 8)]
    weights = torch.tensor([1.0, 2.0], dtype=D)
    freqs = [torch.bincount(t, minlength=vocab).to(D) / len(t) for t in tokens]
    grams = [h.T @ h / h.shape[0] for h in hidden]
    for beta in (1.0, 0.3):
        out = tied_embedding_delta(taus, freqs, grams, weights, alpha=1.0, beta=beta)
        assert torch.allclose(out, _tied_reference(base, taus, tokens, hidden, weights, beta), atol=1e-9)


def test_tied_embedding_satisfies_its_sylvester_equation_with_shrunk_grams():
    gen = torch.Generator().manual_seed(2)
    vocab, d = 9, 4
    taus = [torch.randn(vocab, d, generator=gen, dtype=D) for _ in range(3)]
    freqs = [torch.rand(vocab, generator=gen, dtype=D) * (torch.rand(vocab, generator=gen) > 0.4) for _ in range(3)]
    grams = []
    for _ in range(3):
        h = torch.randn(10, d, generator=gen, dtype=D)
        grams.append(h.T @ h / 10)
    weights = torch.tensor([1.0, 1.0, 0.5], dtype=D)
    alpha, beta = 0.7, 2.0
    delta = tied_embedding_delta(taus, freqs, grams, weights, alpha=alpha, beta=beta)
    c = sum(w * f for f, w in zip(freqs, weights))
    g = sum(w * shrink(gr, alpha) for gr, w in zip(grams, weights))
    r = sum(w * (beta * f.unsqueeze(1) * t + t @ shrink(gr, alpha)) for t, f, gr, w in zip(taus, freqs, grams, weights))
    assert torch.allclose(beta * c.unsqueeze(1) * delta + delta @ g, r, atol=1e-10)


def test_tied_embedding_limits():
    # beta -> 0: each row is lm_head-only RegMean; no hidden data at all (G = 0 up to damping)
    # with every row seen: the count-weighted mean
    gen = torch.Generator().manual_seed(3)
    vocab, d = 5, 3
    taus = [torch.randn(vocab, d, generator=gen, dtype=D) for _ in range(2)]
    freqs = [torch.rand(vocab, generator=gen, dtype=D) + 0.1 for _ in range(2)]
    grams = []
    for _ in range(2):
        h = torch.randn(8, d, generator=gen, dtype=D)
        grams.append(h.T @ h / 8)
    w = torch.ones(2, dtype=D)
    lm_only = tied_embedding_delta(taus, freqs, grams, w, alpha=0.9, beta=0.0)
    rows = regmean_delta(taus, grams, w, alpha=0.9)  # RegMean of lm_head (rows = vocab, inputs = hidden)
    assert torch.allclose(lm_only, rows, atol=1e-10)
    lookup_only = tied_embedding_delta(taus, freqs, grams, w, alpha=0.9, beta=1e9)
    assert torch.allclose(lookup_only, count_weighted_delta(taus, freqs, w), atol=1e-6)


def test_folded_regmean_solves_least_squares_over_the_product():
    gen = torch.Generator().manual_seed(4)
    out_f, d = 5, 4
    base = torch.randn(out_f, d, generator=gen, dtype=D)
    g_base = torch.rand(d, generator=gen, dtype=D) + 0.5
    taus = [0.3 * torch.randn(out_f, d, generator=gen, dtype=D) for _ in range(3)]
    scales = [g_base + 0.2 * torch.randn(d, generator=gen, dtype=D) for _ in range(3)]
    normalized = [torch.randn(n, d, generator=gen, dtype=D) for n in (12, 9, 15)]
    weights = torch.tensor([1.0, 0.5, 1.5], dtype=D)
    grams = [(x * s).T @ (x * s) / x.shape[0] for x, s in zip(normalized, scales)]
    delta, g_star = folded_regmean(taus, base, scales, g_base, grams, weights, alpha=1.0)
    # reference: min_V sum_i w_i / n_i ||X^_i V^T - X^_i diag(g_i) W_i^T||^2
    a = torch.cat([(w / x.shape[0]) ** 0.5 * x for x, w in zip(normalized, weights)])
    y = torch.cat([(w / x.shape[0]) ** 0.5 * (x * s) @ (base + t).T
                   for x, s, t, w in zip(normalized, scales, taus, weights)])
    v_ref = torch.linalg.lstsq(a, y).solution.T
    assert torch.allclose((base + delta) * g_star, v_ref, atol=1e-10)
    assert torch.allclose(g_star, sum(w * s for s, w in zip(scales, weights)) / weights.sum())


def test_folded_regmean_equals_regmean_when_scales_agree():
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(3, 4, generator=gen, dtype=D)
    g = torch.rand(4, generator=gen, dtype=D) + 0.5
    taus = [torch.randn(3, 4, generator=gen, dtype=D) for _ in range(2)]
    grams = []
    for _ in range(2):
        x = torch.randn(7, 4, generator=gen, dtype=D) * g
        grams.append(x.T @ x / 7)
    w = torch.ones(2, dtype=D)
    delta, _ = folded_regmean(taus, base, [g, g], g, grams, w, alpha=0.8)
    assert torch.allclose(delta, regmean_delta(taus, grams, w, alpha=0.8), atol=1e-10)


def test_norm_given_weights_solves_least_squares_in_g():
    gen = torch.Generator().manual_seed(6)
    out_f, d = 6, 3
    merged = torch.randn(out_f, d, generator=gen, dtype=D)
    models = [torch.randn(out_f, d, generator=gen, dtype=D) for _ in range(2)]
    scales = [torch.rand(d, generator=gen, dtype=D) + 0.5 for _ in range(2)]
    normalized = [torch.randn(n, d, generator=gen, dtype=D) for n in (10, 7)]
    weights = torch.tensor([1.0, 3.0], dtype=D)
    grams = [(x * s).T @ (x * s) / x.shape[0] for x, s in zip(normalized, scales)]
    g = norm_given_weights(merged, models, scales, grams, weights)
    # reference: X^ diag(g) M^T = sum_j g_j outer(X^[:, j], M[:, j]): one design column per g_j
    cols, targets = [], []
    for x, s, wm, w in zip(normalized, scales, models, weights):
        k = (w / x.shape[0]) ** 0.5
        cols.append(torch.stack([k * torch.outer(x[:, j], merged[:, j]).reshape(-1) for j in range(d)], 1))
        targets.append(k * ((x * s) @ wm.T).reshape(-1))
    ref = torch.linalg.lstsq(torch.cat(cols), torch.cat(targets)).solution
    assert torch.allclose(g, ref, atol=1e-9)
