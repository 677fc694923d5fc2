"""Activation-aware math against independent references: inverses, least squares, OBS properties."""

import pytest
import torch

from mergecli.methods import catalog
from dataclasses import replace

from mergecli.methods.pipeline import TensorPlan, merge_parts, merge_tensor
from mergecli.methods.hessian_math import (DegenerateStatistics, count_weighted_delta, damped_cholesky,
                                           inverse_diagonal, obs_saliency, obs_trim, regmean_delta,
                                           regmean_deltas, wanda_score)
from mergecli.methods.sparsify import rank_probabilities, topk_mask
from mergecli.methods.stats import LayerStats, TokenCounts

METHODS = catalog()


def correlated_inputs(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64)
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ mix


def test_inverse_diagonal_is_diag_of_the_inverse_of_the_damped_gram():
    x = correlated_inputs(50, 6, 0)
    gram = x.T @ x / 50
    damped = gram + 0.01 * torch.diagonal(gram).mean() * torch.eye(6, dtype=torch.float64)
    expected = torch.diagonal(torch.linalg.inv(damped))
    assert torch.allclose(inverse_diagonal(gram, 0.01), expected, rtol=1e-10)
    # not the squared diagonal of the Cholesky factor of the inverse (the seed's mistake)
    chol_diag = torch.diagonal(torch.linalg.cholesky(torch.linalg.inv(damped), upper=True))
    assert not torch.allclose(chol_diag ** 2, expected)


def test_sparsegpt_and_wanda_scores_written_out():
    x = correlated_inputs(40, 5, 1)
    gram = x.T @ x / 40
    tau = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    stats = LayerStats(gram)
    hinv = torch.diagonal(torch.linalg.inv(gram + 0.01 * torch.diagonal(gram).mean() * torch.eye(5, dtype=torch.float64)))
    assert torch.allclose(obs_saliency(tau, stats.hinv_diag), tau ** 2 / hinv)
    norms = x.norm(dim=0) / 40 ** 0.5  # ||X_j|| / sqrt(n)
    assert torch.allclose(wanda_score(tau, stats.diag), tau.abs() * norms)


def test_damping_is_retried_upward_and_never_a_pseudo_inverse():
    rank_one = torch.ones(4, 4, dtype=torch.float64)
    _, delta = damped_cholesky(rank_one, damp=1e-30)
    assert delta > 1e-30
    with pytest.raises(DegenerateStatistics):
        inverse_diagonal(torch.zeros(4, 4))


def test_dead_inputs_rank_lowest():
    x = correlated_inputs(30, 4, 3)
    x[:, 2] = 0  # input 2 never fires
    gram = x.T @ x / 30
    tau = torch.ones(2, 4, dtype=torch.float64)
    scores = obs_saliency(tau, inverse_diagonal(gram))
    assert torch.all(scores[:, 2] < scores[:, [0, 1, 3]].min())


def test_all_dead_layer_falls_back_to_magnitude_in_the_merge():
    tau = torch.tensor([[3.0, -1.0, 0.5, 2.0]])
    stats = [LayerStats(torch.zeros(4, 4, dtype=torch.float64))]
    delta, _, _ = merge_tensor(TensorPlan(METHODS["ties"], [1.0], {"score": "sparsegpt", "density": 0.5}, "w"), [tau],
                               stats=stats)
    assert torch.equal(delta, torch.tensor([[3.0, 0.0, 0.0, 2.0]]))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_obs_compensated_trim_reconstructs_better_than_plain_masking(seed):
    """Property: ||X (tau - tau')^T||^2 is lower with OBS updates than masking at equal density."""
    x = correlated_inputs(256, 32, seed)
    gram = x.T @ x / 256
    tau = torch.randn(16, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(100 + seed))
    compensated = obs_trim(tau, gram, density=0.25, block=8)
    assert (compensated != 0).sum() == 16 * 32 // 4
    plain_obs = tau * topk_mask(obs_saliency(tau, inverse_diagonal(gram)), 0.25)
    plain_mag = tau * topk_mask(tau.abs(), 0.25)

    def err(t):
        return ((x @ (tau - t).T) ** 2).sum()

    assert err(compensated) < err(plain_obs)
    assert err(compensated) < err(plain_mag)


def test_regmean_equals_least_squares_on_the_stacked_inputs():
    """With alpha = 1 and equal token counts, RegMean is argmin_W sum_i ||X_i W^T - X_i W_i^T||^2."""
    g = torch.Generator().manual_seed(5)
    base = torch.randn(3, 6, dtype=torch.float64, generator=g)
    w = [base + 0.3 * torch.randn(3, 6, dtype=torch.float64, generator=g) for _ in range(3)]
    xs = [correlated_inputs(40, 6, 10 + i) for i in range(3)]
    grams = [x.T @ x / 40 for x in xs]
    delta = regmean_delta(torch.stack([wi - base for wi in w]), grams, torch.ones(3, dtype=torch.float64), alpha=1.0)
    stacked_x = torch.cat(xs)
    stacked_y = torch.cat([x @ wi.T for x, wi in zip(xs, w)])
    lstsq = torch.linalg.lstsq(stacked_x, stacked_y).solution.T
    assert torch.allclose(base + delta, lstsq, atol=1e-8)


def test_scaled_parts_of_regmean_are_its_per_model_terms():
    """`lambda: learned` scales each model's part: with scales s, the merged delta is
    sum_i s_i tau_i G~_i (sum_j G~_j)^-1, written out here with an explicit inverse; the parts of
    the additive methods sum to their merge."""
    g = torch.Generator().manual_seed(11)
    taus = [torch.randn(3, 6, dtype=torch.float64, generator=g) for _ in range(3)]
    grams = [(lambda x: x.T @ x / 40)(correlated_inputs(40, 6, 20 + i)) for i in range(3)]
    tilde = [0.9 * gm + 0.1 * torch.diag(torch.diagonal(gm)) for gm in grams]
    scales = [0.5, 1.0, 1.7]
    inverse = torch.linalg.inv(sum(tilde))
    expected = sum(s * t @ gt @ inverse for s, t, gt in zip(scales, taus, tilde))
    stats = [LayerStats(gm) for gm in grams]
    merged, _, _ = merge_tensor(TensorPlan(METHODS["regmean"], [1.0] * 3, {}, "w", scales=scales), taus, stats=stats)
    assert torch.allclose(merged.double(), expected, atol=1e-5)
    additive = [name for name, method in METHODS.items() if method.additive]
    assert {"regmean", "task_arithmetic", "dare_linear"} <= set(additive) and "ties" not in additive
    for name in additive:
        whole, _, _ = merge_tensor(TensorPlan(METHODS[name], [1.0] * 3, {}, "w"), taus, stats=stats)
        parts = [merge_tensor(TensorPlan(METHODS[name], [1.0] * 3, {}, "w", scales=[float(i == j) for j in range(3)]),
                              taus, stats=stats)[0] for i in range(3)]
        assert torch.allclose(sum(parts), whole, atol=1e-5), name


def test_every_part_in_one_pass_is_each_part_merged_alone():
    """`write_parts` makes every fine-tune's part at once (`merge_parts`): each tensor read and
    trimmed once, RegMean's Gram sum factored once. Each part is what merging with that one scaling
    gives alone (`merge_tensor`) -- bit for bit where the method combines per scaling, and for
    RegMean's one-factorization shortcut within fp64 rounding of the explicit formula
    s_i tau_i G~_i (sum_j G~_j)^-1."""
    g = torch.Generator().manual_seed(12)
    taus = [torch.randn(5, 8, generator=g) for _ in range(3)]
    grams = [(lambda x: x.T @ x / 40)(correlated_inputs(40, 8, 30 + i)) for i in range(3)]
    stats = [LayerStats(gm) for gm in grams]
    scalings = [None, *([float(i == j) for j in range(3)] for i in range(3)), [0.5, 0.0, 2.0]]
    for name in ("regmean", "task_arithmetic", "dare_linear", "ties", "breadcrumbs"):
        plan = TensorPlan(METHODS[name], [1.0, 0.8, 1.2], {"density": 0.6}, "w", linear=True)
        together, kept, offered = merge_parts(plan, scalings, taus, stats=stats, base=torch.ones(5, 8))
        assert together.shape == (len(scalings), 5, 8)
        for merged, scales in zip(together, scalings):
            alone, k, n = merge_tensor(replace(plan, scales=scales), taus, stats=stats, base=torch.ones(5, 8))
            assert (k, n) == (kept, offered)
            if name == "regmean":
                assert torch.allclose(merged, alone, rtol=0, atol=1e-6), name
            else:
                assert torch.equal(merged, alone), name
    tilde = [0.9 * gm + 0.1 * torch.diag(torch.diagonal(gm)) for gm in grams]
    inverse = torch.linalg.inv(sum(w * t for w, t in zip([1.0, 0.8, 1.2], tilde)))
    parts = regmean_deltas([t.double() for t in taus], scalings[1:4], grams, torch.tensor([1.0, 0.8, 1.2]))
    for i, part in enumerate(parts):
        assert torch.allclose(part, [1.0, 0.8, 1.2][i] * taus[i].double() @ tilde[i] @ inverse, atol=1e-10)


def test_regmean_alpha_shrinks_off_diagonals():
    g = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    taus = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]], dtype=torch.float64)
    zero_alpha = regmean_delta(taus, [g, g], torch.ones(2, dtype=torch.float64), alpha=0.0)
    # alpha = 0: G~ = diag(G) = 2I for both -> plain average of the task vectors
    assert torch.allclose(zero_alpha, torch.tensor([[0.5, 0.5]], dtype=torch.float64))


def test_rank_probabilities_average_to_density_and_rise_with_score():
    scores = torch.randn(50, 40, generator=torch.Generator().manual_seed(6))
    for d in (0.1, 0.2, 0.5, 0.8):
        p = rank_probabilities(scores, d)
        assert abs(p.mean().item() - d) < 1e-9 and p.max() <= 1.0 and p.min() >= 0.0
        flat_scores, flat_p = scores.flatten(), p.flatten()
        order = flat_scores.argsort()
        assert torch.all(flat_p[order].diff() >= 0)
    rows = rank_probabilities(scores, 0.3, per_row=True)
    assert torch.allclose(rows.mean(dim=1), torch.full((50,), 0.3, dtype=torch.float64))


def test_dare_with_sparsegpt_is_unbiased():
    """Survivors divided by their keep-probability: the mean over seeds approaches tau."""
    x = correlated_inputs(64, 8, 7)
    stats = [LayerStats(x.T @ x / 64)]
    tau = torch.randn(4, 8, generator=torch.Generator().manual_seed(8))
    runs = [merge_tensor(TensorPlan(METHODS["dare_linear"], [1.0], {"score": "sparsegpt", "density": 0.5, "seed": s},
                                    "w"),
                         [tau], stats=stats)[0] for s in range(3000)]
    assert torch.allclose(torch.stack(runs).mean(0), tau, atol=0.12)


@pytest.mark.parametrize("d", [5, 128, 300, 1100])
def test_upper_gram_accumulation_then_symmetrize_is_x_transpose_x(d):
    """H is accumulated on and right of the diagonal blocks only, then mirrored: equal to X^T X."""
    from mergecli.engine.collect import add_upper_gram, symmetrize

    gen = torch.Generator().manual_seed(d)
    h = torch.zeros(d, d)
    batches = [torch.randn(64, d, generator=gen) for _ in range(3)]
    for x in batches:
        add_upper_gram(h, x)
    x = torch.cat(batches)
    assert torch.allclose(symmetrize(h), x.T @ x, rtol=1e-5, atol=1e-3)
    assert torch.equal(h, h.T)


def test_count_weighted_embedding_rows_by_hand():
    # token 0: model A saw it 3 times, model B once -> (3*1 + 1*5) / 4 = 2; token 1: only B -> 7;
    # token 2: nobody -> the plain mean (10 + 20) / 2 = 15
    a = torch.tensor([[1.0], [2.0], [10.0]])
    b = torch.tensor([[5.0], [7.0], [20.0]])
    out = count_weighted_delta([a, b], [torch.tensor([3.0, 0, 0]), torch.tensor([1.0, 2, 0])], torch.ones(2))
    assert torch.allclose(out, torch.tensor([[2.0], [7.0], [15.0]]))


def test_count_weighted_is_regmean_of_a_one_hot_lookup():
    """Reference: min_E sum_i w_i / n_i ||X_i E - X_i E_i||^2 with one-hot X_i, stacked for lstsq."""
    gen = torch.Generator().manual_seed(0)
    vocab, d = 6, 4
    base = torch.randn(vocab, d, generator=gen, dtype=torch.float64)
    taus = [torch.randn(vocab, d, generator=gen, dtype=torch.float64) for _ in range(3)]
    tokens = [torch.randint(0, vocab - 1, (n,), generator=gen) for n in (20, 9, 14)]  # token vocab-1 unseen
    weights = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    one_hot = [torch.nn.functional.one_hot(t, vocab).to(torch.float64) for t in tokens]
    a = torch.cat([(w / len(t)) ** 0.5 * x for t, x, w in zip(tokens, one_hot, weights)])
    y = torch.cat([(w / len(t)) ** 0.5 * x @ (base + tau) for t, x, tau, w in zip(tokens, one_hot, taus, weights)])
    seen = a.abs().sum(0) > 0
    ref = torch.linalg.lstsq(a[:, seen], y).solution - base[seen]
    freqs = [torch.bincount(t, minlength=vocab).to(torch.float64) / len(t) for t in tokens]
    out = count_weighted_delta(taus, freqs, weights)
    assert torch.allclose(out[seen], ref, atol=1e-10)
    assert torch.allclose(out[~seen], (sum(w * t for t, w in zip(taus, weights)) / weights.sum())[~seen])
    # computed a few rows at a time (a 7B embedding's fp64 terms would be GBs), the same bits
    assert torch.equal(count_weighted_delta(taus, freqs, weights, block=2 * d), out)
    # through the registered method: embedding stats select it, `embedding: mean` and linear stats do not
    stats = [TokenCounts(f) for f in freqs]
    merged, _, _ = merge_tensor(TensorPlan(METHODS["regmean"], weights.tolist(), {}, "embed"), taus, stats=stats)
    assert torch.allclose(merged.double(), out, atol=1e-6)
    plain, _, _ = merge_tensor(TensorPlan(METHODS["regmean"], weights.tolist(), {"embedding": "mean"}, "embed"), taus,
                               stats=stats)
    assert torch.allclose(plain.double(), sum(w * t for t, w in zip(taus, weights)) / weights.sum(), atol=1e-6)
    # data-aware scores do not rank embedding rows by token counts: magnitude, as without statistics
    trimmed, _, _ = merge_tensor(TensorPlan(METHODS["ties"], weights.tolist(), {"score": "wanda", "density": 0.5},
                                            "embed"),
                                 taus, stats=stats)
    unscored, _, _ = merge_tensor(TensorPlan(METHODS["ties"], weights.tolist(),
                                             {"score": "magnitude", "density": 0.5}, "embed"),
                                  taus)
    assert torch.equal(trimmed, unscored)
