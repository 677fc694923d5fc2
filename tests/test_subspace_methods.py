"""TSV-M, Iso-C, Iso-CTS, WUDI and SVC against independent references: each reference below is a
transcription, in numpy fp64, of the authors' public code (TSV: AntoAndGar/task_singular_vectors,
Iso: danielm1405/iso-merging, SVC: lyymuwu/SVC) or, for WUDI's closed form, the paper's objective
solved as a least-squares problem -- none of them calls mergecli. Then the properties each method
promises, the rule for tensors that are not layer matrices, and the methods through merge_tensor."""

import numpy as np
import pytest
import torch

from mergecli.methods import catalog
from mergecli.methods.pipeline import TensorPlan, merge_tensor
from mergecli.methods.subspace import iso_c, iso_cts, polar, svc, svd, tsv_merge, wudi, wudi_system

METHODS = catalog()
SUBSPACE = ["tsv", "iso_c", "iso_cts", "wudi", "svc"]


def task_matrices(count, m=12, n=20, seed=0, noise=0.05):
    """Task matrices (out x in) sharing a rank-3 part, each with a rank-3 part of its own, plus a
    little full-rank noise: distinct, well separated singular values."""
    gen = torch.Generator().manual_seed(seed)
    shared = torch.randn(m, 3, generator=gen) @ torch.randn(3, n, generator=gen)
    return [shared + torch.randn(m, 3, generator=gen) @ torch.randn(3, n, generator=gen)
            + noise * torch.randn(m, n, generator=gen) for _ in range(count)]


def low_rank_matrices(count, rank=2, m=12, n=20, seed=1):
    """LoRA-like task matrices: rank 2 each, so every sum has numerically zero singular values."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(m, rank, generator=gen) @ torch.randn(rank, n, generator=gen) for _ in range(count)]


def close(ours, reference, tol=1e-5):
    np.testing.assert_allclose(ours.double().numpy(), reference, atol=tol * max(1.0, np.abs(reference).max()),
                               rtol=tol)


# -- references (numpy, fp64) ------------------------------------------------------------------------
def reference_tsv(taus):
    """compute_and_sum_svd_mem_reduction, for one 2-D key."""
    vecs = [t.double().numpy() for t in taus]
    sv_reduction = 1 / len(vecs)
    for i, vec in enumerate(vecs):
        u, s, v = np.linalg.svd(vec, full_matrices=False)
        if i == 0:
            sum_u, sum_s, sum_v = np.zeros_like(u), np.zeros_like(s), np.zeros_like(v)
        k = int(s.shape[0] * sv_reduction)
        sum_u[:, i * k:(i + 1) * k] = u[:, :k]
        sum_s[i * k:(i + 1) * k] = s[:k]
        sum_v[i * k:(i + 1) * k, :] = v[:k, :]
    u_u, _, v_u = np.linalg.svd(sum_u, full_matrices=False)
    u_v, _, v_v = np.linalg.svd(sum_v, full_matrices=False)
    return np.linalg.multi_dot((u_u, v_u, np.diag(sum_s), u_v, v_v))


def reference_iso_c(taus):
    merged = sum(t.double().numpy() for t in taus)
    u, s, v = np.linalg.svd(merged, full_matrices=False)
    return np.linalg.multi_dot((u, np.diag(np.ones_like(s) * s.mean()), v))


def reference_iso_cts(taus, common_space_fraction=0.8):
    ws = [t.double().numpy() for t in taus]
    shape = ws[0].shape
    combined_w = sum(ws)
    common = int(min(shape) * common_space_fraction)
    task_specific_total = round((min(shape) - common) / len(ws)) * len(ws)
    common = min(shape) - task_specific_total
    u, s, v = np.linalg.svd(combined_w, full_matrices=False)
    cu, cs, cv = u[:, :common], s[:common], v[:common, :]
    per_task = int((min(shape) - common) / len(ws))
    for i, w in enumerate(ws):
        w_ts = w - cu @ cu.T @ w
        u_ts, s_ts, v_ts = np.linalg.svd(w_ts, full_matrices=False)
        if i == 0:
            all_u, all_s, all_v = np.zeros_like(u_ts), np.zeros_like(s_ts), np.zeros_like(v_ts)
        all_u[:, i * per_task:(i + 1) * per_task] = u_ts[:, :per_task]
        all_s[i * per_task:(i + 1) * per_task] = s_ts[:per_task]
        all_v[i * per_task:(i + 1) * per_task, :] = v_ts[:per_task, :]
    start = len(ws) * per_task
    all_u[:, start:start + common], all_s[start:start + common], all_v[start:start + common, :] = cu, cs, cv
    uu, _, vu = np.linalg.svd(all_u, full_matrices=False)
    uv, _, vv = np.linalg.svd(all_v, full_matrices=False)
    flat = np.ones_like(all_s) * all_s.mean()
    return np.linalg.multi_dot((uu @ vu, np.diag(flat), uv @ vv))


def reference_wudi(taus, damp):
    """argmin_X sum_i |(X - tau_i) tau_i^T|^2 / |tau_i|^2 + delta |X - S|^2 (S = sum_i tau_i,
    delta = damp * mean(diag sum_i tau_i^T tau_i / |tau_i|^2) = damp * T / n), row by row as one
    least-squares problem: x [c_1 tau_1^T ... c_T tau_T^T  sqrt(delta) I] ~ [c_1 y tau_1^T ... sqrt(delta) s]."""
    ts = [t.double().numpy() for t in taus]
    n = ts[0].shape[1]
    delta = damp * len(ts) / n
    c = [1 / np.linalg.norm(t) for t in ts]  # square roots of the weights 1 / |tau_i|^2
    design = np.concatenate([ci * t.T for ci, t in zip(c, ts)] + [np.sqrt(delta) * np.eye(n)], axis=1)
    start = sum(ts)
    target = np.concatenate([ci * t @ t.T for ci, t in zip(c, ts)] + [np.sqrt(delta) * start], axis=1)
    solution, *_ = np.linalg.lstsq(design.T, target.T, rcond=None)
    return solution.T


def reference_svc(taus, alpha, coefficient=0.3):
    """layer_wise_Align on TA's merge (coefficient * sum), target = -1, rank by rank."""
    wts = [t.double().numpy() for t in taus]
    wm = coefficient * sum(wts)
    um, sm, vh = np.linalg.svd(wm, full_matrices=False)
    calibrated = sm.copy()
    for r in range(len(sm)):
        am = um[:, r] @ wm
        s = []
        for w in wts:
            ai = um[:, r] @ w
            s.append(am @ ai / max(ai @ ai, 1e-12))
        eta = max(np.mean(s), alpha) if all(v > 0 for v in s) else 1.0
        calibrated[r] = sm[r] / eta
    return um @ np.diag(calibrated) @ vh


def wudi_objective(x, taus):
    """The paper's interference: sum_i |(x - tau_i) tau_i^T|^2 / |tau_i|^2."""
    return sum(float(((x.double() - t.double()) @ t.double().T).square().sum() / t.double().square().sum())
               for t in taus)


# -- each method equals its reference ------------------------------------------------------------------
@pytest.mark.parametrize("count,n", [(3, 20), (2, 20), (5, 18)])  # r = 12: divisible by 3 and 2, not by 5
def test_tsv_equals_the_authors_algorithm(count, n):
    taus = task_matrices(count, n=n)
    close(tsv_merge(taus), reference_tsv(taus))


def test_iso_c_equals_the_authors_algorithm():
    taus = task_matrices(3)
    close(iso_c(taus), reference_iso_c(taus))


@pytest.mark.parametrize("count,fraction", [(3, 0.8), (2, 0.8), (4, 0.5), (3, 1.0)])
def test_iso_cts_equals_the_authors_algorithm(count, fraction):
    taus = task_matrices(count, seed=count)
    close(iso_cts(taus, common_fraction=fraction), reference_iso_cts(taus, fraction))


def test_iso_cts_with_the_whole_rank_common_is_iso_c():
    taus = task_matrices(3)
    close(iso_cts(taus, common_fraction=1.0), iso_c(taus).double().numpy())


@pytest.mark.parametrize("damp", [0.01, 1e-6])
def test_wudi_equals_the_least_squares_solution_of_its_objective(damp):
    taus = task_matrices(3, m=10, n=14)
    close(wudi(taus, damp=damp), reference_wudi(taus, damp))


@pytest.mark.parametrize("count", [2, 4])
def test_svc_equals_the_authors_algorithm(count):
    taus = task_matrices(count, seed=7)
    close(svc(taus, alpha=None, scale=0.3), reference_svc(taus, alpha=1 / count))
    close(svc(taus, alpha=1.0, scale=1.0), reference_svc(taus, alpha=1.0, coefficient=1.0))


# -- the properties they promise --------------------------------------------------------------------
def test_iso_c_and_iso_cts_spectra_are_flat():
    for taus in (task_matrices(3), low_rank_matrices(3)):
        for merged in (iso_c(taus), iso_cts(taus)):
            s = torch.linalg.svdvals(merged.double())
            nonzero = s[s > 1e-5 * s[0]]
            assert torch.allclose(nonzero, nonzero[0].expand_as(nonzero), rtol=1e-5)


def test_iso_c_level_is_the_mean_of_all_singular_values_of_the_sum():
    taus = task_matrices(3)
    s_sum = torch.linalg.svdvals(sum(taus).double())
    assert torch.allclose(torch.linalg.svdvals(iso_c(taus).double()), s_sum.mean().expand(12), rtol=1e-5)


def test_polar_factor_is_orthonormal_and_the_nearest_such_matrix():
    stacked = torch.cat([torch.linalg.svd(t)[0][:, :4] for t in task_matrices(3)], dim=1)  # 12 x 12
    q = polar(stacked).double()
    assert torch.allclose(q.T @ q, torch.eye(12, dtype=torch.float64), atol=1e-5)
    # the orthogonal Procrustes solution: X (X^T X)^{-1/2}, from an eigendecomposition
    x = stacked.double()
    vals, vecs = torch.linalg.eigh(x.T @ x)
    assert torch.allclose(q, x @ vecs @ torch.diag(vals.rsqrt()) @ vecs.T, atol=1e-4)


def test_tsv_keeps_every_tasks_top_singular_values_in_orthogonal_directions():
    """U_perp and V_perp orthonormal means the merge's singular values are exactly the selected ones."""
    taus = task_matrices(3)
    kept = torch.cat([torch.linalg.svdvals(t)[:4] for t in taus])
    merged = torch.linalg.svdvals(tsv_merge(taus).double())
    assert torch.allclose(merged, kept.double().sort(descending=True).values, rtol=1e-5)


def test_tsv_of_one_task_is_its_truncation():
    tau = task_matrices(1)[0]
    u, s, vh = torch.linalg.svd(tau, full_matrices=False)
    close(tsv_merge([tau], rank_fraction=0.25), ((u[:, :3] * s[:3]) @ vh[:3]).double().numpy())


def test_wudi_satisfies_its_normal_equations():
    taus = task_matrices(3, m=10, n=14)
    weights = [1.0, 0.5, 2.0]
    damp = 0.01
    x = wudi(taus, weights, damp).double()
    gram, rhs, start = wudi_system(taus, weights)
    delta = damp * float(torch.diagonal(gram).mean())
    lhs = x @ (gram + delta * torch.eye(14, dtype=torch.float64))
    assert torch.allclose(lhs, rhs + delta * start, atol=1e-5 * float(rhs.abs().max()))
    # G is full rank here (3 x 10 rows span the 14 inputs): with almost no damping, X G = B itself
    x = wudi(taus, weights, 1e-9).double()
    assert torch.allclose(x @ gram, rhs, atol=1e-4 * float(rhs.abs().max()))


def test_wudi_interferes_less_than_the_sum_and_than_the_papers_adam_steps():
    taus = [0.01 * t for t in task_matrices(3, m=10, n=14)]
    adam = torch.nn.Parameter(sum(taus).clone())
    optimizer = torch.optim.Adam([adam], lr=1e-5)
    stacked = torch.stack(taus)
    norms = stacked.reshape(3, -1).norm(dim=1).square()
    for _ in range(300):
        loss = (((adam[None] - stacked) @ stacked.transpose(1, 2)).square() / norms[:, None, None]).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    ours = wudi_objective(wudi(taus), taus)
    assert ours < wudi_objective(adam.detach(), taus) < wudi_objective(sum(taus), taus)


def test_wudi_of_one_task_is_that_task_whatever_its_weight():
    tau = task_matrices(1, m=14, n=10)[0]  # 14 rows span the 10 inputs: the objective pins X = tau
    close(wudi([tau], [3.0], damp=1e-8), tau.double().numpy(), tol=1e-4)


def test_svc_halves_a_direction_two_tasks_share_and_leaves_one_a_task_opposes():
    gen = torch.Generator().manual_seed(3)
    q_out = torch.linalg.qr(torch.randn(12, 2, generator=gen))[0]
    q_in = torch.linalg.qr(torch.randn(20, 2, generator=gen))[0]
    shared = torch.outer(q_out[:, 0], q_in[:, 0])
    opposed = torch.outer(q_out[:, 1], q_in[:, 1])
    # sum = 2 shared + 0.5 opposed: along `shared` both tasks give it fully (s = 2, 2 -> halved);
    # along `opposed` task 2 pulls the other way (s = 0.5, -1 -> left as it is)
    merged = svc([shared + opposed, shared - 0.5 * opposed], alpha=1.0, scale=1.0)
    close(merged, (shared + 0.5 * opposed).double().numpy())
    # two identical tasks: every direction halved -> the task itself
    tau = task_matrices(1)[0]
    close(svc([tau, tau], alpha=1.0, scale=1.0), tau.double().numpy())


def test_svc_never_grows_a_singular_value_with_alpha_at_least_one():
    for taus in (task_matrices(3, seed=5), low_rank_matrices(4)):
        before = torch.linalg.svdvals(sum(taus).double())
        after = torch.linalg.svdvals(svc(taus, alpha=1.0, scale=1.0).double())
        assert (after <= before * (1 + 1e-5) + 1e-6).all()
        assert (after < before * 0.99).any()  # the shared part was inflated, and is shrunk


def test_svc_grows_a_singular_value_at_most_one_over_alpha_times():
    taus = task_matrices(4, seed=6)
    for alpha in (0.25, 0.5):
        before = torch.linalg.svdvals(0.3 * sum(taus).double())
        after = torch.linalg.svdvals(svc(taus, alpha=alpha, scale=0.3).double())
        assert (after <= before / alpha * (1 + 1e-5)).all()


def test_rank_deficient_sums_keep_only_the_directions_the_tasks_span():
    """The authors' Iso-C gives the mean singular value to null-space directions an SVD picks at
    random; ours is their result restricted to the tasks' column and row spaces."""
    taus = low_rank_matrices(3)  # sum of rank 6 in 12 x 20
    total = sum(t.double() for t in taus)
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    cols, rows = u[:, :6] @ u[:, :6].T, vh[:6].T @ vh[:6]
    close(iso_c(taus), (cols @ torch.from_numpy(reference_iso_c(taus)) @ rows).numpy())
    for merged in (iso_c(taus), tsv_merge(taus), iso_cts(taus)):  # TSV: each task keeps its 2 real directions
        assert torch.linalg.matrix_rank(merged, rtol=1e-5) == 6


def test_results_do_not_depend_on_the_sign_convention_of_the_svd():
    """Flipping a task matrix's sign flips its singular vectors; TSV's and Iso's merges of -tau are
    exactly -(merge of tau) as they must be, whatever signs LAPACK picks."""
    taus = task_matrices(3)
    for fn in (tsv_merge, iso_c, iso_cts):
        close(fn([-t for t in taus]), -fn(taus).double().numpy())


@pytest.mark.parametrize("failing", [1, 2])
def test_methods_survive_lapack_svd_failing_to_converge(monkeypatch, failing):
    """gesdd can fail to converge on clustered spectra (it did on one Iso-CTS layer of a 135M
    model). The SVD is then retried in fp64 and, if that fails too, taken from the Gram's
    eigendecomposition: the merges still equal the authors' algorithms."""
    real = torch.linalg.svd
    calls = {"n": 0}

    def flaky(x, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] % 3 == 1 or (failing == 2 and x.dtype == torch.float64 and calls["n"] % 3 == 2):
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge (error code: 1).")
        return real(x, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", flaky)
    taus = task_matrices(3, seed=3)
    close(iso_cts(taus, common_fraction=0.8), reference_iso_cts(taus, 0.8))
    close(iso_c(taus), reference_iso_c(taus))
    wide = [t.T.contiguous() for t in taus]  # more columns than rows: the eigh route transposes
    close(iso_cts(wide, common_fraction=0.8), reference_iso_cts(wide, 0.8))
    low = sum(low_rank_matrices(2))  # rank 4 of 12: the eigh route completes U's null space
    x = low.double().numpy()
    u_ref, s_ref, vh_ref = np.linalg.svd(x, full_matrices=False)
    close(polar(low), u_ref[:, :4] @ vh_ref[:4])
    calls["n"] = 0
    u, s, vh = svd(low)
    close(s, s_ref)
    close(u @ torch.diag(s) @ vh, x)
    assert torch.allclose(u.T @ u, torch.eye(12), atol=1e-5)


# -- tensors that are not layer matrices; the methods through merge_tensor ------------------------------
@pytest.mark.parametrize("name", SUBSPACE)
def test_tensors_that_are_not_linear_weights_take_the_weighted_mean(name):
    gen = torch.Generator().manual_seed(2)
    bias = [torch.randn(7, generator=gen) for _ in range(3)]
    embedding = task_matrices(3)
    weights = [1.0, 0.5, 2.0]
    expected_bias = sum(w * t for w, t in zip(weights, bias))
    expected_embedding = sum(w * t for w, t in zip(weights, embedding))
    if name == "svc":  # the task-arithmetic merge SVC calibrates, with its coefficient
        expected_bias, expected_embedding = 0.3 * expected_bias, 0.3 * expected_embedding
    else:
        expected_bias, expected_embedding = expected_bias / 3.5, expected_embedding / 3.5
    merged_bias, _, _ = merge_tensor(TensorPlan(METHODS[name], weights, {}, "b", linear=True),
                                     bias)  # 1-D even if "linear"
    merged_embedding, _, _ = merge_tensor(TensorPlan(METHODS[name], weights, {}, "embed"), embedding)
    assert torch.allclose(merged_bias, expected_bias, atol=1e-6)
    assert torch.allclose(merged_embedding, expected_embedding, atol=1e-5)
    linear, _, _ = merge_tensor(TensorPlan(METHODS[name], weights, {}, "w", linear=True), embedding)
    assert not torch.allclose(linear, merged_embedding, atol=1e-3)


@pytest.mark.parametrize("name,direct", [
    ("tsv", lambda taus, w: tsv_merge(taus, w)),
    ("iso_c", lambda taus, w: iso_c(taus, w)),
    ("iso_cts", lambda taus, w: iso_cts(taus, w, 0.8)),
    ("wudi", lambda taus, w: wudi(taus, w, 0.01)),
    ("svc", lambda taus, w: svc(taus, w, None, 0.3)),
])
def test_methods_through_merge_tensor_with_conv1d_weights_stored_transposed(name, direct):
    """GPT-2's Conv1D stores in x out; the math must see out x in, so the merge of the stored
    (transposed) tensors is the transpose of the merge of the out x in ones."""
    taus = task_matrices(3)  # out x in
    weights = [1.0, 0.5, 2.0]
    base = torch.randn(12, 20, generator=torch.Generator().manual_seed(8))
    delta, kept, offered = merge_tensor(TensorPlan(METHODS[name], weights, {}, "h.0.attn.c_attn.weight", linear=True),
                                        taus)
    close(delta, direct(taus, torch.tensor(weights)).double().numpy())
    assert (kept, offered) == (3 * 240, 3 * 240)
    stored = [t.T.contiguous() for t in taus]
    merged, _, _ = merge_tensor(TensorPlan(METHODS[name], weights, {"lambda": 0.7}, "h.0.attn.c_attn.weight",
                                           transposed=True, linear=True),
                                stored, base=base.T.contiguous())
    close(merged.T, (base + 0.7 * delta).double().numpy())


def test_subspace_methods_are_declared_as_whole_tensor_methods_with_paper_defaults():
    for name in SUBSPACE:
        method = METHODS[name]
        assert method.doc and not method.elementwise and not method.additive and method.trim == "none"
    assert METHODS["iso_cts"].defaults()["common_fraction"] == 0.8
    assert METHODS["svc"].defaults()["scale"] == 0.3
    assert METHODS["tsv"].defaults()["lambda"] == 1.0
    with pytest.raises(ValueError, match="weight"):
        METHODS["wudi"].check(METHODS["wudi"].defaults(), [1.0, -0.5])
    with pytest.raises(ValueError, match="weight"):
        METHODS["iso_c"].check(METHODS["iso_c"].defaults(), [1.0, -1.0])
