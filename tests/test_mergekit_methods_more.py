"""mergekit 0.1.5's nuslerp, multislerp, karcher, sce, nearswap, arcee_fusion, ram, ramplus_tl and
passthrough (issue #27): each against its mergekit source transcribed here in plain torch (the
`mk_*` functions, which take the full weights as mergekit does and call nothing of mergecli), run
through `merge_tensor` as a merge would; hand-computed cases; the edge rules mergekit has (parallel
and antipodal points, zero norms, sign and variance ties); chunk and thread invariance.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from mergecli.methods import catalog
from mergecli.methods import reduce
from mergecli.methods.pipeline import CHUNK_ELEMENTS, TensorPlan, merge_tensor
from mergecli.methods.selective import fusion_threshold, nearswap, ram, ramplus_tl, sce, sce_mask
from mergecli.methods.spherical import karcher, multislerp, nuslerp

METHODS = catalog()
ATOL = 1e-6


def t_(*values):
    return torch.tensor(values, dtype=torch.float32)


def randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def merged(name, base, models, weights=None, **params):
    """mergecli's merged weights of `models` (full weights) against `base`."""
    taus = [m - base for m in models]
    out, _, _ = merge_tensor(TensorPlan(METHODS[name], weights or [1.0] * len(models), params, "t"), taus, base=base)
    return out


@pytest.fixture(scope="module")
def family():
    """A base and three fine-tunes sharing part of their update (so their task vectors meet at a
    real angle), and one far model."""
    base = randn(12, 20, seed=0)
    shared = randn(12, 20, seed=1, scale=0.05)
    tunes = [base + shared + randn(12, 20, seed=2 + i, scale=0.05) for i in range(3)]
    return base, tunes, base + randn(12, 20, seed=9)


# -- mergekit 0.1.5, transcribed (merge_methods/*.py) ----------------------------------------------
def mk_nuslerp(t, v0, v1, dim=-1, eps=1e-8, flatten=False):
    out_shape = v0.shape

    def _normalize(x, eps=1e-7):
        return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=eps)

    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    v0_u, v1_u = _normalize(v0), _normalize(v1)
    cos_theta = torch.sum(v0_u * v1_u, dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos_theta.square()) <= eps ** 2
    theta = torch.acos(torch.where(colinear, 0, cos_theta))
    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    result = torch.where(colinear, (1 - t) * v0 + t * v1, result)
    if dim != -1 and not flatten:
        result = result.transpose(dim, -1)
    return result.reshape(out_shape)


def mk_nuslerp_merge(tensors, weights, base=None, row_wise=False, flatten=True):
    total = sum(weights)
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    dim = 0 if row_wise else -1
    if base is not None:
        return base + mk_nuslerp(t, tensors[0] - base, tensors[1] - base, dim=dim, flatten=flatten)
    return mk_nuslerp(t, tensors[0], tensors[1], dim=dim, flatten=flatten)


def mk_multislerp(tensors, weight, base_tensor=None, normalize_weights=True, eps=1e-8):
    if len(tensors) == 1:
        return tensors[0]
    tensors = torch.stack(tensors, dim=0)
    if base_tensor is not None:
        tensors -= base_tensor
    tensors_flat = tensors.view(tensors.shape[0], -1)
    weights = torch.tensor(weight, dtype=tensors.dtype)
    if normalize_weights:
        weights = weights / weights.sum()
    norms = torch.norm(tensors_flat, dim=-1, keepdim=True)
    unit_tensors = tensors_flat / (norms + eps)
    mean = (unit_tensors * weights.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if tensors.shape[0] == 2:
            res = (tensors[0] * weights[0] + tensors[1] * weights[1]).view(tensors.shape[1:])
            return res + base_tensor if base_tensor is not None else res
        raise ValueError("zero mean")
    mean = mean / mean_norm
    dots = (unit_tensors * mean).sum(-1, keepdim=True)
    tangent_vectors = unit_tensors - dots * mean
    tangent_result = (tangent_vectors * weights.view(-1, 1)).sum(0)
    tangent_norm = torch.norm(tangent_result) + eps
    result = mean * torch.cos(tangent_norm) + tangent_result * (torch.sin(tangent_norm) / tangent_norm)
    result = (result * (norms.squeeze(-1) * weights).sum()).view(tensors.shape[1:])
    return result + base_tensor if base_tensor is not None else result


def mk_karcher(tensors, max_iter=10, tol=1e-5):
    if len(tensors) == 1:
        return tensors[0]
    alphas = [1.0 / len(tensors)] * len(tensors)
    norms, units = [], []
    for tensor in tensors:
        norm = torch.linalg.vector_norm(tensor)
        norms.append(norm)
        units.append(torch.zeros_like(tensor) if norm.item() == 0.0 else tensor / norm)
    valid = [i for i, norm in enumerate(norms) if norm.item() > tol]
    if not valid:
        return sum(tensor * 0 for tensor in tensors)
    valid_alphas = [alphas[i] for i in valid]
    normalized = [a / sum(valid_alphas) for a in valid_alphas]
    valid_units = [units[i] for i in valid]
    mean = torch.zeros_like(valid_units[0])
    for alpha, unit in zip(normalized, valid_units):
        mean += alpha * unit
    mean_norm = torch.linalg.vector_norm(mean)
    mean = valid_units[0].clone() if mean_norm.item() < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for alpha, unit in zip(normalized, valid_units):
            dot = torch.clamp(torch.dot(mean.flatten(), unit.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += alpha * (theta / torch.sin(theta)) * (unit - dot * mean)
        tangent_norm = torch.linalg.vector_norm(tangent)
        if tangent_norm.item() < tol:
            break
        mean = torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)
        unit_norm = torch.linalg.vector_norm(mean)
        if unit_norm.item() > tol:
            mean = mean / unit_norm
    return sum(alpha * norm for alpha, norm in zip(alphas, norms)) * mean


def mk_sce(base, tensors, select_topk=1.0):
    tvs = torch.stack([t - base for t in tensors], dim=0)
    if select_topk < 1:
        if select_topk <= 0:
            mask = torch.zeros_like(tvs[0])
        else:
            var = torch.var(tvs, dim=0, unbiased=False)
            k = int(torch.count_nonzero(var) * select_topk)
            mask = torch.zeros_like(var)
            if k:
                mask.view(-1)[torch.topk(var.abs().view(-1), k=k, largest=True).indices] = 1
        tvs = tvs * mask.unsqueeze(0)
    sign = tvs.sign()
    majority = (tvs.sum(dim=0) >= 0).to(tvs.dtype) * 2 - 1
    erase = sign == majority
    weights = tvs.square().reshape(tvs.shape[0], -1).mean(dim=1)
    s = torch.sum(weights).item()
    weights = torch.ones_like(weights) / weights.shape[0] if abs(s) < 1e-6 else weights / s
    while weights.dim() < tvs.dim():
        weights = weights.unsqueeze(-1)
    erased = weights * erase
    return base + (tvs * erased).sum(dim=0) / torch.sum(erased, dim=0).clamp(min=1e-6)


def mk_nearswap(a, b, t):
    weight = (t / torch.abs(a - b).clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * b + (1 - weight) * a


def mk_arcee_fusion(base, model):
    diff = (model - base).abs()
    p = F.softmax(model, dim=-1) + 1e-8
    q = F.softmax(base, dim=-1) + 1e-8
    importance = diff * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    ordered, _ = torch.sort(importance.reshape(-1))
    q1, median, q3 = ordered[(torch.tensor([0.25, 0.5, 0.75]) * (ordered.numel() - 1)).long()]
    mask = (importance >= median + 1.5 * (q3 - q1)).float()
    return base + (model - base) * mask


def mk_ram(base, tensors, epsilon=1e-5, plus=None):
    tv = torch.stack([t - base for t in tensors], dim=0).view(len(tensors), -1)
    nonzero = tv.abs() > epsilon
    counts = nonzero.sum(dim=0, keepdim=True)
    overlap, unique = counts > 1, counts == 1
    tvz = tv * nonzero
    scale = 1
    if plus is not None:
        r, alpha = plus
        rho = (nonzero & overlap).sum(dim=1) / (nonzero & unique).sum(dim=1).clamp(min=epsilon)
        scale = (1 + r * rho.clamp(min=0, max=alpha)).unsqueeze(-1)
    merged = (tvz * unique * scale + tvz * overlap / counts.clamp(min=1)).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)


# -- the table -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, needs_base, elementwise, params", [
    ("nuslerp", True, False, {"origin": "base", "base_weight": 1.0, "nuslerp_flatten": True,
                              "nuslerp_row_wise": False}),
    ("multislerp", True, False, {"origin": "base", "base_weight": 1.0, "normalize_weights": True, "eps": 1e-8}),
    ("karcher", True, False, {"origin": "zero", "base_weight": 1.0, "max_iter": 10, "tol": 1e-5}),
    ("sce", False, False, {"select_topk": 1.0}),
    ("nearswap", True, True, {"t": 1e-4}),
    ("arcee_fusion", True, False, {}),
    ("ram", False, True, {"epsilon": 1e-5}),
    ("ramplus_tl", False, False, {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5}),
    ("passthrough", True, True, {"scale": 1.0}),
])
def test_registered_with_mergekits_defaults(name, needs_base, elementwise, params):
    method = METHODS[name]
    assert method.defaults() == params
    assert (method.needs_base, method.elementwise, method.absent, method.trim) == (needs_base, elementwise, "zero",
                                                                                 "none")
    assert not method.additive and not method.needs_stats


def test_model_count_and_weight_rules():
    with pytest.raises(ValueError, match="2 model"):
        METHODS["nuslerp"].check({"origin": "base"}, [1.0])
    with pytest.raises(ValueError, match="1 model"):
        METHODS["nuslerp"].check({"origin": "zero"}, [1.0, 1.0])
    with pytest.raises(ValueError, match="sum to 0"):
        METHODS["multislerp"].check({"origin": "zero", "base_weight": -1.0, "normalize_weights": True}, [1.0])
    METHODS["multislerp"].check({"origin": "base", "base_weight": 0.0, "normalize_weights": False}, [1.0, -1.0])
    for name in ("nearswap", "arcee_fusion", "passthrough"):
        with pytest.raises(ValueError, match="exactly one model"):
            METHODS[name].check(METHODS[name].defaults(), [1.0, 1.0])


@pytest.mark.parametrize("name, params, weights, message", [
    # nuslerp: t = w1 / (w0 + w1) = -19 extrapolates; |1| + |-0.95| over 0.05 = 39
    ("nuslerp", {"origin": "base"}, [1.0, -0.95], "weight: the weights 1, -0.95 sum to 0.05; their weighted mean can "
                                                 "be 39 times"),
    ("nuslerp", {"origin": "zero", "base_weight": 1.0}, [-0.95], "the weights 1, -0.95 (base_weight first) sum to"),
    ("nuslerp", {"origin": "base"}, [1.0, -1.0], "can be inf times"),  # mergekit: t = 0.5 below |sum| 1e-6
    ("multislerp", {"origin": "base", "normalize_weights": True}, [1.0, 0.5, -1.4], "can be 29 times the largest"),
    ("multislerp", {"origin": "zero", "base_weight": 0.5, "normalize_weights": True}, [-0.45],
     "or normalize_weights: false"),
    ("karcher", {"origin": "zero", "base_weight": 1.0}, [1.0, -1.9], "the weights 1, 1, -1.9 (base_weight first) "
                                                                     "sum to 0.1; their weighted mean can be 39 times"),
    ("karcher", {"origin": "base", "base_weight": 1.0}, [2.0, -1.0, -0.9], "can be 39 times"),
])
def test_spherical_means_that_could_amplify_more_than_ten_times_are_refused(name, params, weights, message):
    full = {**METHODS[name].defaults(), **params}
    with pytest.raises(ValueError, match="at most 10 is allowed") as info:
        METHODS[name].check(full, weights)
    assert message in str(info.value)


@pytest.mark.parametrize("name, params, weights", [
    ("nuslerp", {"origin": "base"}, [0.4, 0.6]),
    ("nuslerp", {"origin": "base"}, [1.0, -0.5]),  # t = -1: extrapolates, but within 3x
    ("nuslerp", {"origin": "zero", "base_weight": 0.0}, [1.0]),
    ("multislerp", {"origin": "base", "normalize_weights": False}, [1.0, -0.95]),  # no division
    ("multislerp", {"origin": "base", "normalize_weights": True}, [0.0]),  # one model: returned as it is
    ("multislerp", {"origin": "zero", "base_weight": 1.0, "normalize_weights": True}, [1.0, -0.5]),
    ("karcher", {"origin": "zero", "base_weight": 1.0}, [1.0, 1.0]),
    ("karcher", {"origin": "zero", "base_weight": 0.0}, [1.0, 1.0]),  # the base takes no part
])
def test_spherical_weights_within_the_bound_pass(name, params, weights):
    METHODS[name].check({**METHODS[name].defaults(), **params}, weights)


# -- nuslerp -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("flatten, row_wise", [(True, False), (False, False), (False, True)])
def test_nuslerp_matches_mergekit_with_and_without_base(family, flatten, row_wise):
    base, (a, b, _), far = family
    params = {"nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise}
    expected = mk_nuslerp_merge([a, b], [0.4, 0.6], base, row_wise, flatten)
    assert torch.allclose(merged("nuslerp", base, [a, b], [0.4, 0.6], **params), expected, atol=ATOL)
    expected = mk_nuslerp_merge([a, far], [0.3, 0.9], None, row_wise, flatten)  # a is the first point
    ours = merged("nuslerp", a, [far], [0.9], origin="zero", base_weight=0.3, **params)
    assert torch.allclose(ours, expected, atol=ATOL)


def test_nuslerp_quarter_turn_and_t_from_weights():
    # theta = pi/2, t = 3 / (1 + 3) = 0.75: (sin(pi/8), sin(3 pi/8))
    out = merged("nuslerp", torch.zeros(2), [t_(1, 0), t_(0, 1)], [1.0, 3.0])
    assert torch.allclose(out, t_(math.sin(math.pi / 8), math.sin(3 * math.pi / 8)))
    # weights summing to ~0: t = 0.5
    out = merged("nuslerp", torch.zeros(2), [t_(1, 0), t_(0, 1)], [1.0, -1.0])
    assert torch.allclose(out, t_(math.sqrt(0.5), math.sqrt(0.5)))


def test_nuslerp_row_wise_interpolates_columns():
    # mergekit's nuslerp_row_wise: true takes vectors along dim 0, the columns of an out x in matrix
    v0 = t_(1, 0, 0, 1).reshape(2, 2)  # columns (1, 0) and (0, 1); rows the same
    v1 = t_(0, 1, 1, 0).reshape(2, 2)
    columns = nuslerp(0.5, v0, v1, flatten=False, row_wise=True)
    rows = nuslerp(0.5, v0, v1, flatten=False, row_wise=False)
    for j in range(2):
        expected = (v0[:, j] + v1[:, j]) * math.sin(math.pi / 4)  # each pair at a quarter turn
        assert torch.allclose(columns[:, j], expected)
        assert torch.allclose(rows[j], (v0[j] + v1[j]) * math.sin(math.pi / 4))
    a, b = randn(3, 4, seed=1), randn(3, 4, seed=2)
    columns = nuslerp(0.3, a, b, flatten=False, row_wise=True)
    assert torch.allclose(columns, nuslerp(0.3, a.T, b.T, flatten=False).T, atol=ATOL)
    assert not torch.allclose(columns, nuslerp(0.3, a, b, flatten=False))


def test_nuslerp_linear_only_when_exactly_parallel_and_zero_counts_as_orthogonal():
    a = t_(0, 2, 0)
    assert torch.equal(nuslerp(0.25, a, 3 * a), 0.75 * a + 0.25 * 3 * a)  # cos = 1: linear
    assert torch.equal(nuslerp(0.25, a, -a), 0.5 * a)  # cos = -1: linear too
    a = t_(1, 2, 3)
    near = 2 * a + t_(1e-3, 0, 0)  # not parallel to fp32 precision: still the spherical formula
    assert torch.allclose(nuslerp(0.25, a, near), mk_nuslerp(0.25, a, near, flatten=True), atol=ATOL)
    # a zero vector: norm clamped to 1e-7, cos = 0, theta = pi/2
    assert torch.allclose(nuslerp(0.5, torch.zeros(2), t_(3, 4)), math.sin(math.pi / 4) * t_(3, 4))


# -- multislerp -------------------------------------------------------------------------------------
@pytest.mark.parametrize("normalize", [True, False])
def test_multislerp_matches_mergekit(family, normalize):
    base, tunes, far = family
    w = [1.0, 0.5, 0.8]
    expected = mk_multislerp([t.clone() for t in tunes], w, base, normalize)
    assert torch.allclose(merged("multislerp", base, tunes, w, normalize_weights=normalize), expected, atol=ATOL)
    points = [tunes[0], tunes[1], far]  # no base: the first point is mergecli's base, with its weight
    expected = mk_multislerp([p.clone() for p in points], w, None, normalize)
    ours = merged("multislerp", points[0], points[1:], w[1:], origin="zero", base_weight=w[0],
                  normalize_weights=normalize)
    assert torch.allclose(ours, expected, atol=ATOL)


def test_multislerp_two_orthogonal_unit_vectors_meet_at_the_arc_midpoint():
    out = multislerp([t_(1, 0), t_(0, 1)], [0.5, 0.5])
    assert torch.allclose(out, t_(math.sqrt(0.5), math.sqrt(0.5)))
    # scaled by the weighted mean norm: norms 2 and 4 -> 3
    assert torch.allclose(multislerp([t_(2, 0), t_(0, 4)], [1.0, 1.0]), 3 * t_(math.sqrt(0.5), math.sqrt(0.5)))


def test_multislerp_one_model_antipodal_pair_and_balanced_antipodes(family):
    base, (a, _, _), _ = family
    assert torch.allclose(merged("multislerp", base, [a], [0.3]), a, atol=ATOL)  # returned as it is
    u = a - base  # task vectors u and -u, weights 1/2: the mean direction is 0, so linear: 0
    out, _, _ = merge_tensor(TensorPlan(METHODS["multislerp"], [0.5, 0.5], {}, "t"), [u, -u], base=base)
    assert torch.equal(out, base)
    assert torch.equal(mk_multislerp([u, -u], [0.5, 0.5]), torch.zeros_like(u))
    with pytest.raises(ValueError, match="zero"):
        multislerp([t_(1, 0), t_(-1, 0), t_(1, 0), t_(-1, 0)], [1.0, 1.0, 1.0, 1.0])


# -- karcher ------------------------------------------------------------------------------------------
def test_karcher_matches_mergekit_on_the_weights_base_included(family):
    base, tunes, far = family
    points = [tunes[0], tunes[1], far]  # mergekit without base_model: every model a point
    expected = mk_karcher([p.clone() for p in points])
    assert torch.allclose(merged("karcher", points[0], points[1:]), expected, atol=ATOL)
    points = [*tunes, base]  # with base_model (not listed): mergekit appends it as one more point
    expected = mk_karcher([p.clone() for p in points], max_iter=30, tol=1e-7)
    assert torch.allclose(merged("karcher", points[0], points[1:], max_iter=30, tol=1e-7), expected, atol=ATOL)


def test_karcher_of_two_points_is_the_geodesic_midpoint_times_the_mean_norm():
    out = karcher([t_(2, 0), t_(0, 4)], [0.5, 0.5])
    assert torch.allclose(out, 3 * t_(math.sqrt(0.5), math.sqrt(0.5)), atol=1e-6)
    # weighted: a third of the way along the quarter turn
    out = karcher([t_(1, 0), t_(0, 1)], [2 / 3, 1 / 3], max_iter=50, tol=1e-9)
    assert torch.allclose(out, t_(math.cos(math.pi / 6), math.sin(math.pi / 6)), atol=1e-6)


def test_karcher_zero_points_steer_nothing_but_count_in_the_scale():
    assert torch.allclose(karcher([t_(2, 0), t_(0, 0)], [0.5, 0.5]), t_(1, 0))  # direction (1, 0), scale 1
    assert torch.equal(karcher([torch.zeros(3), torch.zeros(3)], [0.5, 0.5]), torch.zeros(3))
    # antipodal: the mean is shorter than tol, so the first direction is kept
    assert torch.allclose(karcher([t_(1, 0), t_(-1, 0)], [0.5, 0.5]), t_(1, 0))


def test_karcher_base_weight_zero_averages_the_models_only(family):
    base, tunes, _ = family
    expected = mk_karcher([t.clone() for t in tunes])
    assert torch.allclose(merged("karcher", base, tunes, base_weight=0.0), expected, atol=ATOL)
    taus = [t - base for t in tunes]  # origin: base, on the task vectors
    assert torch.allclose(merged("karcher", base, tunes, origin="base"), base + mk_karcher(taus), atol=ATOL)


# -- sce ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("select_topk", [1.0, 0.5, 0.1, 0.0])
def test_sce_matches_mergekit(family, select_topk):
    base, tunes, _ = family
    expected = mk_sce(base, tunes, select_topk)
    assert torch.allclose(merged("sce", base, tunes, [0.2, 5.0, 1.0], select_topk=select_topk), expected, atol=ATOL)


def test_sce_by_hand():
    # tau_1 = (2, -1, 1), tau_2 = (1, 1, -3): sums (3, 0, -2) elect (+, +, -); energies 2 and 11/3,
    # coefficients 6/17 and 11/17; agreeing: entry 0 both, entry 1 only model 2, entry 2 only model 2
    c1, c2 = 6 / 17, 11 / 17
    out = sce([t_(2, -1, 1), t_(1, 1, -3)])
    assert torch.allclose(out, t_((2 * c1 + 1 * c2) / (c1 + c2), 1, -3))
    # select_topk 1/3 of 3 non-zero variances: only entry 2 (variance 4) survives
    assert torch.allclose(sce([t_(2, -1, 1), t_(1, 1, -3)], 1 / 3 + 1e-9), t_(0, 0, -3))


def test_sce_tiny_task_vectors_get_equal_weights_and_ties_keep_exactly_k():
    small = [t_(1e-4, 2e-4), t_(-3e-4, 1e-4)]  # energies sum < 1e-6: coefficients 1/2 each, not 1/3, 2/3
    assert torch.allclose(sce(small), t_(-3e-4, 1.5e-4))
    taus = torch.stack([t_(1, -1, 1, -1, 0), t_(-1, 1, -1, 1, 0)])  # four equal variances, one zero
    mask = sce_mask(taus, 0.5)  # k = int(4 * 0.5) = 2: the first two in flat order
    assert mask.tolist() == [1, 1, 0, 0, 0]
    # a sum of exactly 0 elects +: only the positive entries agree
    assert torch.allclose(sce([t_(1, -1), t_(-1, 1)]), t_(1, 1))


# -- nearswap ----------------------------------------------------------------------------------------
def test_nearswap_matches_mergekit_and_by_hand(family):
    base, (a, _, _), _ = family
    for t in (0.0, 0.01, 0.05, 1.0):
        assert torch.allclose(merged("nearswap", base, [a], t=t), mk_nearswap(base, a, t), atol=ATOL)
    # |diff| 0.005 <= t: the model; 0.02: halfway (w = 0.5); 0.1: w = 0.1
    out = nearswap(torch.zeros(3), t_(0.005, 0.02, -0.1), 0.01)
    assert torch.allclose(out, t_(0.005, 0.01, -0.01))
    assert torch.equal(merged("nearswap", base, [base.clone()], t=0.01), base)


# -- arcee_fusion ------------------------------------------------------------------------------------
def test_arcee_fusion_matches_mergekit(family):
    base, (a, _, _), far = family
    for model in (a, far):
        assert torch.allclose(merged("arcee_fusion", base, [model]), mk_arcee_fusion(base, model), atol=ATOL)
    vec = randn(50, seed=3)
    model = vec + randn(50, seed=4, scale=0.1)
    assert torch.allclose(merged("arcee_fusion", vec, [model]), mk_arcee_fusion(vec, model), atol=ATOL)


def test_fusion_threshold_is_median_plus_one_and_a_half_iqr_and_exact_on_large_tensors():
    # 0..8: quartiles at floor(q * 8) = 2, 4, 6 -> 4 + 1.5 * 4
    assert float(fusion_threshold(torch.arange(9, dtype=torch.float32).flip(0))) == 10.0
    big = randn(300_001, seed=5).abs()  # above kth_largest's direct size: the same value as a full sort
    ordered = torch.sort(big).values
    q1, median, q3 = ordered[(torch.tensor([0.25, 0.5, 0.75]) * (big.numel() - 1)).long()]
    assert torch.equal(fusion_threshold(big), median + 1.5 * (q3 - q1))


# -- ram, ramplus_tl -----------------------------------------------------------------------------------
@pytest.mark.parametrize("epsilon", [1e-5, 0.03])
def test_ram_and_ramplus_match_mergekit(epsilon):
    base = randn(12, 20, seed=0)
    models = [base + randn(12, 20, seed=1 + i, scale=0.05) * (randn(12, 20, seed=10 + i) > 0.5) for i in range(3)]
    assert torch.allclose(merged("ram", base, models, epsilon=epsilon), mk_ram(base, models, epsilon), atol=ATOL)
    for r, alpha in ((0.1, 0.2), (0.5, 3.0)):
        ours = merged("ramplus_tl", base, models, epsilon=epsilon, r=r, alpha=alpha)
        assert torch.allclose(ours, mk_ram(base, models, epsilon, plus=(r, alpha)), atol=ATOL)


def test_ram_by_hand():
    taus = [t_(0.5, 0.0, 0.0, 1e-6), t_(0.3, 0.2, 0.0, 0.0), t_(0.0, 0.0, 0.0, 0.0)]
    assert torch.allclose(ram(taus), t_(0.4, 0.2, 0.0, 0.0))  # |1e-6| <= epsilon: not a change
    # model 1 shares 1 entry, changes 1 alone: rho = 1 -> lambda = 1 + 0.5 * min(1, 0.8) = 1.4;
    # model 0 shares 1, alone 1: the same; model 2 changes nothing
    taus = [t_(0.5, 0.1, 0.0), t_(0.3, 0.0, 0.2), t_(0.0, 0.0, 0.0)]
    assert torch.allclose(ramplus_tl(taus, r=0.5, alpha=0.8), t_(0.4, 0.14, 0.28))


# -- passthrough --------------------------------------------------------------------------------------
def test_passthrough_is_the_model_times_scale(family):
    base, (a, _, _), _ = family
    assert torch.allclose(merged("passthrough", base, [a]), a, atol=ATOL)
    assert torch.allclose(merged("passthrough", base, [a], scale=0.5), 0.5 * a, atol=ATOL)


# -- the pipeline: absent models, chunks, threads ---------------------------------------------------------
@pytest.mark.parametrize("name, count", [("nuslerp", 2), ("multislerp", 3), ("karcher", 3), ("sce", 3), ("ram", 3),
                                         ("ramplus_tl", 3)])
def test_an_absent_model_is_the_base_there(family, name, count):
    # (a one-model method whose model lacks the tensor is not merged: the base's tensor is copied)
    base, tunes, _ = family
    taus = [t - base for t in tunes[:count]]
    method = METHODS[name]
    with_none, _, _ = merge_tensor(TensorPlan(method, [1.0] * count, {}, "t"), [None, *taus[1:]], base=base)
    with_zero, _, _ = merge_tensor(TensorPlan(method, [1.0] * count, {}, "t"), [torch.zeros_like(base), *taus[1:]],
                                   base=base)
    assert torch.equal(with_none, with_zero)


def test_elementwise_methods_give_the_same_bits_in_chunks():
    rows, cols = 2 * CHUNK_ELEMENTS // 256 + 6, 256  # several chunks of rows
    base = randn(rows, cols, seed=0)
    taus = [randn(rows, cols, seed=1 + i, scale=0.02) for i in range(3)]
    out, _, _ = merge_tensor(TensorPlan(METHODS["ram"], [1.0] * 3, {"epsilon": 0.01}, "t"), taus, base=base)
    assert torch.equal(out, base + ram(taus, 0.01))
    out, _, _ = merge_tensor(TensorPlan(METHODS["nearswap"], [1.0], {"t": 0.01}, "t"), taus[:1], base=base)
    assert torch.equal(out, base + (nearswap(base, taus[0], 0.01) - base))


@pytest.mark.parametrize("name, count, params", [
    ("nuslerp", 2, {}), ("nuslerp", 1, {"origin": "zero"}), ("multislerp", 3, {}), ("karcher", 3, {}),
    ("sce", 3, {"select_topk": 0.3}), ("sce", 1, {}), ("arcee_fusion", 1, {}), ("ramplus_tl", 3, {"epsilon": 0.05}),
])
def test_whole_tensor_methods_do_not_depend_on_the_thread_count(name, count, params):
    base = randn(300, 230, seed=0)  # 69000 entries: torch would split a full reduction across threads
    taus = [randn(300, 230, seed=1, scale=0.05) + randn(300, 230, seed=2 + i, scale=0.05) for i in range(count)]
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(merge_tensor(TensorPlan(METHODS[name], [1.0, 0.5, 0.8][:count], params, "t"), taus,
                                     base=base)[0])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(outs[0], out) for out in outs[1:])


def test_reductions_are_exact_sums_in_a_fixed_order():
    x = randn(100_003, seed=1)
    y = randn(100_003, seed=2)
    assert math.isclose(float(reduce.total(x)), float(x.double().sum()), rel_tol=1e-5, abs_tol=1e-3)
    assert math.isclose(float(reduce.norm(x)), float(x.double().norm()), rel_tol=1e-6)
    assert math.isclose(float(reduce.dot(x, y)), float(x.double() @ y.double()), rel_tol=1e-5, abs_tol=1e-3)
    small = x[:1000]  # at most a block: torch's own reduction, bit for bit
    assert torch.equal(reduce.total(small), small.sum()) and torch.equal(reduce.norm(small), small.norm())
    assert torch.equal(reduce.last_sum(x.reshape(1, -1)), reduce.total(x).reshape(1, 1))
    rows = x[:100_000].reshape(100, 1000)
    assert torch.equal(reduce.last_sum(rows), rows.sum(dim=-1, keepdim=True))
