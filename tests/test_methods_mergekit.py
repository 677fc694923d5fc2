"""SLERP, weighted average, Model Stock, DELLA, Breadcrumbs, mergekit's rescale and unnormalised
TIES: hand-computed cases and the papers' formulas written out independently of the code."""

import math

import numpy as np
import pytest
import torch

from mergecli.methods.consensus import disjoint_sum, weighted_mean
from mergecli.methods.interpolate import slerp, weighted_average
from mergecli.methods.masks import (breadcrumbs_band, breadcrumbs_counts, breadcrumbs_mask, della_probabilities,
                                    l1_factor, l1_rescale, normalized_ranks, sample_mask)
from mergecli.methods.sparsify import random_stream
from mergecli.methods.stock import model_stock, stock_ratio


def t_(*values):
    return torch.tensor(values, dtype=torch.float32)


# -- SLERP ---------------------------------------------------------------------------------------
def test_slerp_quarter_turn_midpoint():
    # theta = pi/2: both coefficients sin(pi/4) / sin(pi/2) = sqrt(2)/2
    out = slerp(t_(1, 0), t_(0, 1), 0.5)
    assert torch.allclose(out, t_(math.sqrt(0.5), math.sqrt(0.5)))


def test_slerp_endpoints_are_the_inputs_even_with_different_norms():
    a, b = t_(2, 0, 1), t_(0, 3, -1)
    assert torch.allclose(slerp(a, b, 0.0), a)
    assert torch.allclose(slerp(a, b, 1.0), b)


def test_slerp_unit_vectors_rotate_by_t_theta():
    # a at 0 degrees, b at 60 degrees in the xy-plane: t = 0.25 lands at 15 degrees, unit norm
    a = t_(1, 0, 0)
    b = t_(math.cos(math.pi / 3), math.sin(math.pi / 3), 0)
    out = slerp(a, b, 0.25)
    assert torch.allclose(out, t_(math.cos(math.pi / 12), math.sin(math.pi / 12), 0), atol=1e-7)


def test_slerp_keeps_shape_and_treats_the_tensor_as_one_vector():
    a = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    b = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    x, y = a.reshape(-1).double(), b.reshape(-1).double()
    theta = math.acos(float(x @ y / (x.norm() * y.norm())))
    t = 0.3
    expected = (math.sin((1 - t) * theta) * x + math.sin(t * theta) * y) / math.sin(theta)
    out = slerp(a, b, t)
    assert out.shape == (3, 4)
    assert torch.allclose(out.double().reshape(-1), expected, atol=1e-6)


def test_slerp_near_parallel_and_antiparallel_fall_back_to_linear():
    a = t_(1, 2, 3)
    b = 2 * a + t_(1e-4, 0, 0)  # cos > 0.9995
    assert torch.allclose(slerp(a, b, 0.25), 0.75 * a + 0.25 * b)
    assert torch.allclose(slerp(a, -a, 0.25), 0.5 * a)  # (1 - t) a + t (-a)


def test_slerp_zero_tensor_counts_as_orthogonal():
    # |a| = 0 <= eps: cos = 0, theta = pi/2, result = sin(t pi/2) b
    out = slerp(torch.zeros(2), t_(3, 4), 0.5)
    assert torch.allclose(out, math.sin(math.pi / 4) * t_(3, 4))


# -- weighted average (linear, as mergekit) -------------------------------------------------------
def test_linear_equals_average_of_full_weights():
    base, tau1, tau2 = t_(1, 1), t_(2, 0), t_(0, 4)
    theta1, theta2 = base + tau1, base + tau2  # [3, 1], [1, 5]

    def merged(*args, **kwargs):  # weighted_average gives the change from the base
        return base + weighted_average(base, *args, **kwargs)

    assert torch.allclose(merged([tau1, tau2], [1, 3]), (1 * theta1 + 3 * theta2) / 4)  # [1.5, 4]
    assert torch.allclose(merged([tau1, tau2], [1, 3]), t_(1.5, 4))
    assert torch.allclose(merged([tau1, tau2], [1, 3], base_weight=1), (base + theta1 + 3 * theta2) / 5)
    assert torch.allclose(merged([tau1, tau2], [0.5, 0.5], normalize=False), t_(2, 3))
    assert torch.allclose(merged([tau1, tau2], [1, 1], normalize=False), theta1 + theta2)
    with pytest.raises(ValueError, match="sum to 0"):
        weighted_average(base, [tau1, tau2], [1, -1])


# -- Model Stock ---------------------------------------------------------------------------------
def test_model_stock_two_models_at_sixty_degrees():
    tau1, tau2 = t_(1, 0), t_(0.5, math.sqrt(3) / 2)
    t = 2 * 0.5 / (1 + 0.5)  # N cos / (1 + (N - 1) cos) = 2/3
    assert float(stock_ratio([tau1, tau2])) == pytest.approx(t)
    assert torch.allclose(model_stock([tau1, tau2]), t * (tau1 + tau2) / 2)


def test_model_stock_three_models_pairwise_sixty_degrees():
    taus = [t_(1, 0, 0), t_(0.5, math.sqrt(3) / 2, 0), t_(0.5, 1 / (2 * math.sqrt(3)), math.sqrt(2 / 3))]
    assert float(stock_ratio(taus)) == pytest.approx(3 * 0.5 / (1 + 2 * 0.5))  # 0.75


def test_model_stock_orthogonal_gives_base_and_opposite_is_singular():
    assert float(stock_ratio([t_(1, 0), t_(0, 2)])) == 0.0
    assert float(stock_ratio([t_(1, 2), t_(-1, -2)])) == 0.0  # 1 + (N - 1) cos = 0: keep the base
    assert torch.equal(model_stock([torch.zeros(3), torch.zeros(3)]), torch.zeros(3))  # unchanged tensor


def test_model_stock_filter_wise_is_per_row():
    tau1 = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    tau2 = torch.tensor([[0.5, math.sqrt(3) / 2], [0.0, 1.0]])
    t = stock_ratio([tau1, tau2], filter_wise=True)
    assert t.shape == (2, 1)
    assert torch.allclose(t.reshape(-1), t_(2 / 3, 0.0))
    assert torch.allclose(model_stock([tau1, tau2], filter_wise=True), t * (tau1 + tau2) / 2)
    with pytest.raises(ValueError):
        stock_ratio([tau1])


def test_model_stock_against_the_paper_on_random_vectors():
    g = torch.Generator().manual_seed(0)
    taus = [torch.randn(50, generator=g) + 1.0 for _ in range(4)]
    x = np.stack([tau.double().numpy() for tau in taus])
    pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    cos = np.mean([x[i] @ x[j] / np.linalg.norm(x[i]) / np.linalg.norm(x[j]) for i, j in pairs])
    t = 4 * cos / (1 + 3 * cos)
    assert float(stock_ratio(taus)) == pytest.approx(t, rel=1e-5)


# -- DELLA ---------------------------------------------------------------------------------------
def test_della_probabilities_hand_case():
    # |tau| = 0.1, 0.5, 0.3, 0.2: ranks 0, 3, 2, 1 -> r = 0, 1, 2/3, 1/3; p = (d - e) + 2 e r
    p = della_probabilities(t_(0.1, -0.5, 0.3, 0.2).abs(), 0.5, 0.1)
    assert torch.allclose(p, torch.tensor([0.4, 0.6, 0.4 + 0.2 * 2 / 3, 0.4 + 0.2 / 3], dtype=torch.float64))
    assert float(p.mean()) == pytest.approx(0.5)


def test_della_ranks_per_row_and_guards():
    scores = torch.tensor([[3.0, 1.0, 2.0], [1.0, 2.0, 3.0]])
    assert torch.equal(normalized_ranks(scores), torch.tensor([[1.0, 0.0, 0.5], [0.0, 0.5, 1.0]], dtype=torch.float64))
    tied = normalized_ranks(torch.ones(1, 3))
    assert torch.equal(tied, torch.tensor([[0.0, 0.5, 1.0]], dtype=torch.float64))  # ties by position
    assert torch.equal(normalized_ranks(torch.ones(2, 1)), torch.full((2, 1), 0.5, dtype=torch.float64))
    with pytest.raises(ValueError, match="epsilon"):
        della_probabilities(scores, 0.2, 0.2)
    with pytest.raises(ValueError, match="epsilon"):
        della_probabilities(scores, 0.9, 0.1)
    assert torch.equal(della_probabilities(scores, 1.0, 0.3), torch.ones(2, 3, dtype=torch.float64))


def test_della_whole_tensor_ranks_hand_case():
    scores = torch.tensor([[3.0, 1.0, 2.0], [0.5, 2.5, 4.0]])
    # flat order of values: 3, 1, 2, 0.5, 2.5, 4 -> ranks 4, 1, 2, 0, 3, 5 of n - 1 = 5
    expected = torch.tensor([[4, 1, 2], [0, 3, 5]], dtype=torch.float64) / 5
    assert torch.equal(normalized_ranks(scores, per_row=False), expected)


def test_della_sampling_frequencies_follow_the_probabilities():
    # 4000 rows with the same ranking: column j's keep rate estimates p_j
    n_rows, d, eps = 4000, 0.4, 0.3
    scores = torch.arange(1.0, 6.0).repeat(n_rows, 1)
    p = della_probabilities(scores, d, eps)
    keep = sample_mask(p, random_stream(7, "w", 0))
    rate = keep.double().mean(dim=0)
    expected = torch.tensor([0.1, 0.25, 0.4, 0.55, 0.7], dtype=torch.float64)
    assert torch.allclose(p[0], expected)
    assert torch.all((rate - expected).abs() < 4 * torch.sqrt(expected * (1 - expected) / n_rows))


def test_della_sampling_is_chunk_independent():
    p = della_probabilities(torch.rand(10, 8, generator=torch.Generator().manual_seed(0)), 0.5, 0.2)
    stream = random_stream(3, "model.layers.0.mlp.up_proj.weight", 1)
    whole = sample_mask(p, stream)
    pieces = torch.cat([sample_mask(p[:4], stream, 0), sample_mask(p[4:], stream, 32)])
    assert torch.equal(whole, pieces)


# -- mergekit's L1 rescale -----------------------------------------------------------------------
def test_l1_rescale_hand_case():
    tau = t_(1, -2, 3, -4)
    trimmed = t_(0, -2, 0, -4)
    assert torch.allclose(l1_rescale(tau, trimmed), t_(0, -10 / 3, 0, -20 / 3))
    assert l1_factor(10.0, 0.0) == 1.0 and l1_factor(1e-8, 1.0) == 1.0
    assert torch.equal(l1_rescale(tau, torch.zeros(4)), torch.zeros(4))


# -- Breadcrumbs ---------------------------------------------------------------------------------
def test_breadcrumbs_drops_largest_and_smallest():
    values = t_(3, -10, 7, 1, -5, 9, 2, -8, 6, 4)  # |.| = 1..10, shuffled
    mask = breadcrumbs_mask(values.abs(), 0.5, 0.2)  # keep 5, drop the top 2 (10, 9) and bottom 3 (1, 2, 3)
    assert sorted(values.abs()[mask].tolist()) == [4, 5, 6, 7, 8]
    assert breadcrumbs_counts(10, 0.5, 0.2) == (5, 2)


def test_breadcrumbs_fewer_top_dropped_when_density_is_high():
    values = torch.arange(1.0, 11.0)
    mask = breadcrumbs_mask(values, 0.9, 0.2)  # keep 9: only the single largest can go
    assert values[mask].tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert breadcrumbs_mask(values, 1.0, 0.2).all()  # density 1 keeps everything, as mergekit
    assert breadcrumbs_mask(values, 0.3, 0.0).tolist() == [False] * 7 + [True] * 3  # gamma 0: plain top-k


def test_breadcrumbs_ties_and_chunks():
    scores = torch.ones(4)
    # keep 2, drop 1 from the top: ordering is (score desc, position asc) -> top-3 {0,1,2} minus top-1 {0}
    assert breadcrumbs_mask(scores, 0.5, 0.25).tolist() == [False, True, True, False]
    band = breadcrumbs_band(scores, 0.5, 0.25)
    assert torch.cat([band.mask(scores[:2]), band.mask(scores[2:])]).tolist() == [False, True, True, False]


def test_breadcrumbs_large_tensor_matches_a_sort():
    # above 2^16 entries the thresholds come from the sampled bracket: check against a full sort
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(300, 700, generator=g).abs()
    d, gamma = 0.3, 0.05
    n = scores.numel()
    k, top = round(d * n), round(gamma * n)
    order = torch.argsort(scores.reshape(-1), descending=True)
    expected = torch.zeros(n, dtype=torch.bool)
    expected[order[top: top + k]] = True
    band = breadcrumbs_band(scores.reshape(-1), d, gamma)
    chunks = [band.mask(piece) for piece in scores.reshape(-1).split(50_000)]
    assert torch.equal(torch.cat(chunks), expected)


# -- TIES without normalisation ------------------------------------------------------------------
def test_disjoint_sum_hand_case():
    t1, t2, t3 = t_(1, -2, 0), t_(2, 1, 0), t_(-1, -1, 0)
    w = t_(1, 1, 2)
    # sum w t = [1, -3, 0] -> gamma [+, -, 0]; agreeing: [1*1 + 1*2, 1*(-2) + 2*(-1), 0]
    assert torch.equal(disjoint_sum([t1, t2, t3], w), t_(3, -4, 0))


def test_weighted_mean_and_its_guard():
    t1, t2 = t_(1, 2), t_(3, -2)
    assert torch.allclose(weighted_mean([t1, t2], t_(1, 3)), (t1 + 3 * t2) / 4)
    assert torch.allclose(weighted_mean([t1, t2], t_(1, -1)), t1 - t2)  # sum of weights 0: not divided


# -- in the pipeline -----------------------------------------------------------------------------
def test_a_missing_tensor_is_the_base_for_averages_and_no_voter_for_elections():
    """`absent` is declared per method: linear/slerp/model_stock see tau = 0 with its weight (a LoRA's
    untouched weight equals the base's), TIES-like methods leave the model out."""
    from mergecli.methods import catalog
    from mergecli.methods.pipeline import TensorPlan, merge_tensor

    methods = catalog()
    g = torch.Generator().manual_seed(3)
    base, tau = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    averaged, _, offered = merge_tensor(TensorPlan(methods["linear"], [1.0, 3.0], {}, "w"), [tau, None], base=base)
    assert torch.allclose(averaged, base + tau / 4) and offered == 40
    elected, _, offered = merge_tensor(TensorPlan(methods["ties"], [1.0, 3.0], {"density": 1.0}, "w"), [tau, None])
    assert torch.allclose(elected, tau) and offered == 20
    stock, _, _ = merge_tensor(TensorPlan(methods["model_stock"], [1.0, 1.0], {}, "w"), [tau, None], base=base)
    assert torch.allclose(stock, base)  # cos(tau, 0) = 0: the ratio is 0
