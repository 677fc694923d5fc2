"""Merge math against hand-computed cases and peft's merge_utils (an independent implementation)."""

import pytest
import torch
from peft.utils import merge_utils

from mergecli.methods import catalog
from mergecli.methods.pipeline import TensorPlan, merge_tensor, trim
from mergecli.methods.combine import disjoint_mean, elect_sign, weighted_sum
from mergecli.methods.sparsify import bernoulli_mask, keep_count, random_stream, topk_mask

METHODS = catalog()

T1 = torch.tensor([[1.0, -2.0, 0.5, 0.0], [3.0, -0.1, -4.0, 2.0], [0.2, 0.3, -0.4, 1.5]])
T2 = torch.tensor([[-1.5, 1.0, 0.5, 0.2], [2.0, 0.4, 4.0, -3.0], [0.1, -0.6, 0.0, 1.0]])
T3 = torch.tensor([[2.0, -1.0, -0.5, 0.3], [-1.0, -0.2, -2.0, 1.0], [0.0, 0.1, 0.3, -2.0]])


def test_topk_keeps_exactly_k_largest_magnitudes_of_a_3x4_case():
    # density 0.25 of 12 entries -> 3 kept: |3.0|, |-4.0|, |2.0|... ties? |-2.0| and |2.0| tie for third.
    mask = topk_mask(T1.abs(), 0.25)
    assert mask.sum() == 3
    assert mask[1, 0] and mask[1, 2]  # 3.0 and -4.0 always kept
    assert mask[0, 1] ^ mask[1, 3]  # exactly one of the tied 2.0s
    # density 0.5 -> 6 kept: 4.0, 3.0, 2.0, 2.0, 1.5, 1.0
    expected = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 1], [0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(topk_mask(T1.abs(), 0.5), expected)


def test_topk_per_row_keeps_k_in_each_row():
    mask = topk_mask(T1.abs(), 0.5, per_row=True)
    assert mask.sum(dim=1).tolist() == [2, 2, 2]
    assert torch.equal(mask[0], torch.tensor([True, True, False, False]))
    assert torch.equal(mask[2], torch.tensor([False, False, True, True]))


def test_keep_count_is_at_least_one_and_rounds():
    assert keep_count(12, 0.01) == 1
    assert keep_count(10, 0.3) == 3
    assert keep_count(7, 1.0) == 7


def test_ties_on_hand_computed_case():
    """Top-50% magnitude trim, sign election on the weighted sum, disjoint mean - worked by hand.

    trimmed T1 keeps (0,0) 1.0, (0,1) -2.0, (1,0) 3.0, (1,2) -4.0, (1,3) 2.0, (2,3) 1.5
    trimmed T2 keeps (0,0) -1.5, (0,1) 1.0, (1,0) 2.0, (1,2) 4.0, (1,3) -3.0, (2,3) 1.0
    (0,0): 1.0 - 1.5 < 0 -> only T2 agrees -> -1.5     (0,1): -2 + 1 < 0 -> -2.0
    (1,0): both positive -> (3 + 2) / 2 = 2.5          (1,2): -4 + 4 = 0 -> no sign -> 0
    (1,3): 2 - 3 < 0 -> -3.0                           (2,3): (1.5 + 1.0) / 2 = 1.25
    """
    delta, kept, offered = merge_tensor(TensorPlan(METHODS["ties"], [1.0, 1.0],
                                                   {"score": "magnitude", "density": 0.5}, "w"),
                                        [T1, T2])
    expected = torch.tensor([[-1.5, -2.0, 0.0, 0.0], [2.5, 0.0, 0.0, -3.0], [0.0, 0.0, 0.0, 1.25]])
    assert torch.allclose(delta, expected)
    assert (kept, offered) == (12, 24)


def test_weighted_disjoint_mean_divides_by_agreeing_weights():
    t = torch.tensor([[2.0], [4.0], [-1.0]])
    w = torch.tensor([1.0, 3.0, 2.0])
    # weighted sum = 2 + 12 - 2 = 12 -> gamma + ; agreeing: models 0 and 1 -> (2*1 + 4*3) / (1 + 3) = 3.5
    assert torch.allclose(disjoint_mean(t, w), torch.tensor([3.5]))
    assert torch.equal(elect_sign(torch.tensor([[1.0], [-1.0]]), torch.tensor([1.0, 1.0])), torch.tensor([0.0]))
    assert torch.equal(disjoint_mean(torch.tensor([[1.0], [-1.0]]), torch.tensor([1.0, 1.0])), torch.tensor([0.0]))


def test_task_arithmetic_is_weighted_sum():
    delta, _, _ = merge_tensor(TensorPlan(METHODS["task_arithmetic"], [0.5, 0.3, 0.2], {}, "w"), [T1, T2, T3])
    assert torch.allclose(delta, 0.5 * T1 + 0.3 * T2 + 0.2 * T3)
    assert torch.allclose(weighted_sum(torch.stack([T1, T2]), torch.tensor([1.0, 1.0])), T1 + T2)


def test_ties_matches_peft_merge_utils_with_unit_weights():
    """peft divides by the number of agreeing models and elects sign on the unweighted sum; with unit
    weights (and no exactly-zero sums, almost surely for random data) that is our formula."""
    gen = torch.Generator().manual_seed(0)
    taus = [torch.randn(16, 24, generator=gen) for _ in range(3)]
    ours, _, _ = merge_tensor(TensorPlan(METHODS["ties"], [1.0] * 3, {"score": "magnitude", "density": 0.25}, "w"),
                              taus)
    # peft's magnitude_prune keeps int(density * n) = 96 entries; round() gives the same here.
    theirs = merge_utils.ties(taus, torch.ones(3), density=0.25)
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_task_arithmetic_matches_peft():
    gen = torch.Generator().manual_seed(1)
    taus = [torch.randn(8, 8, generator=gen) for _ in range(3)]
    w = [0.2, 0.5, 0.3]
    ours, _, _ = merge_tensor(TensorPlan(METHODS["task_arithmetic"], w, {}, "w"), taus)
    assert torch.allclose(ours, merge_utils.task_arithmetic(taus, torch.tensor(w)), atol=1e-6)


def test_dare_linear_given_the_same_mask_matches_peft_formula():
    """peft draws its mask from the global RNG; with the mask fixed, DARE is t * m / d, summed."""
    gen = torch.Generator().manual_seed(2)
    taus = [torch.randn(32, 32, generator=gen) for _ in range(2)]
    d = 0.3
    params = {"score": "random", "density": d, "seed": 7}
    ours, _, _ = merge_tensor(TensorPlan(METHODS["dare_linear"], [1.0, 1.0], params, "layer.w"), taus)
    masks = [bernoulli_mask(t.shape, d, random_stream(7, "layer.w", i)) for i, t in enumerate(taus)]
    expected = sum(t * m / d for t, m in zip(taus, masks))
    assert torch.allclose(ours, expected, atol=1e-6)


def test_dare_mask_depends_only_on_seed_name_and_model_index():
    a = bernoulli_mask(torch.Size([64, 64]), 0.2, random_stream(0, "x", 1))
    torch.rand(1000)  # global RNG use in between must not matter
    b = bernoulli_mask(torch.Size([64, 64]), 0.2, random_stream(0, "x", 1))
    assert torch.equal(a, b)
    assert not torch.equal(a, bernoulli_mask(torch.Size([64, 64]), 0.2, random_stream(0, "x", 2)))
    assert not torch.equal(a, bernoulli_mask(torch.Size([64, 64]), 0.2, random_stream(0, "y", 1)))
    assert not torch.equal(a, bernoulli_mask(torch.Size([64, 64]), 0.2, random_stream(1, "x", 1)))
    assert abs(a.float().mean().item() - 0.2) < 0.03


def test_dare_rescales_survivors_by_inverse_density():
    tau = torch.ones(100, 100)
    out = trim(tau, METHODS["dare_linear"], {"score": "random", "density": 0.25, "seed": 3}, tensor_name="t",
               model_index=0)
    assert set(out.unique().tolist()) == {0.0, 4.0}


def test_per_row_on_transposed_weights_selects_output_rows():
    """GPT-2 Conv1D stores in x out; per-row top-k must pick within output features (columns there)."""
    w_out_in = torch.randn(6, 10, generator=torch.Generator().manual_seed(4))
    params = {"score": "magnitude", "density": 0.3, "topk": "row"}
    normal, _, _ = merge_tensor(TensorPlan(METHODS["task_arithmetic_topk"], [1.0], params, "a"), [w_out_in])
    transposed, _, _ = merge_tensor(TensorPlan(METHODS["task_arithmetic_topk"], [1.0], params, "a", transposed=True),
                                    [w_out_in.T.contiguous()])
    assert torch.equal(normal, transposed.T)
    assert torch.equal((normal != 0).sum(dim=1), torch.full((6,), 3))


def test_missing_task_vector_is_left_out_of_the_vote():
    """A LoRA that did not touch a tensor neither votes nor dilutes the mean."""
    t = torch.tensor([[2.0, -2.0]])
    delta, _, _ = merge_tensor(TensorPlan(METHODS["ties"], [1.0, 1.0], {"score": "magnitude", "density": 1.0}, "w"),
                               [t, None])
    assert torch.equal(delta, t)


@pytest.mark.parametrize("name", ["ties", "dare_ties", "dare_linear", "task_arithmetic"])
def test_every_method_is_registered_with_its_doc(name):
    assert METHODS[name].doc


@pytest.mark.parametrize("n,density", [(10, 0.3), (70_000, 0.5), (1_048_576, 0.2), (5_000_000, 0.2),
                                       (5_000_000, 0.9), (4_200_000, 0.001), (300_000, 0.99999)])
def test_kth_largest_is_exact_on_large_tensors(n, density):
    from mergecli.methods.sparsify import kth_largest

    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    k = keep_count(n, density)
    value, above = kth_largest(x, k)
    assert value == x.kthvalue(n - k + 1).values and above == int((x > value).sum())
    mask = topk_mask(x, density)
    assert int(mask.sum()) == k and x[mask].min() >= x[~mask].max()


def test_topk_mask_with_many_ties_keeps_exactly_k():
    x = torch.cat([torch.zeros(5_000_000), torch.ones(10)])
    mask = topk_mask(x, 0.5)
    assert int(mask.sum()) == round(0.5 * x.numel()) and mask[-10:].all()


def test_blockwise_disjoint_mean_equals_the_whole_tensor_computation():
    gen = torch.Generator().manual_seed(9)
    taus = [torch.randn(37, 11, generator=gen) * (torch.rand(37, 11, generator=gen) < 0.5) for _ in range(3)]
    w = torch.tensor([1.0, 0.5, 2.0])
    assert torch.equal(disjoint_mean(taus, w, block=50), disjoint_mean(taus, w, block=10**9))
    assert torch.equal(disjoint_mean([t.T for t in taus], w, block=30), disjoint_mean(taus, w).T)
