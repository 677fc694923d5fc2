"""Data-free merges per layer matrix: TSV-M, Iso-C, Iso-CTS, WUDI and SVC (DESIGN §15).

Each works on the task vectors of one linear layer's weight, oriented out x in (rows = outputs),
and looks at it as a matrix: its singular vectors (TSV-M, Iso-*, SVC) or the Gram of its rows
(WUDI). Pure functions on tensors, on the tensors' device; the methods are registered at the end.

Which tensors get the matrix math. The papers' code applies it to every 2-D parameter except a
few named ones (the CLIP text projection; `embed_tokens` and `lm_head` in LLM ports) and merges
every other parameter by the plain mean of the task vectors (TSV-M, Iso-C, Iso-CTS, WUDI) or
keeps the task-arithmetic sum (SVC, a post-processing of that sum). Here the merge tells the
method whether a tensor is a linear layer's weight (`linear`): the matrix math runs where it is
and the tensor is 2-D; everywhere else (embeddings, norms, biases, 1-D and scalar tensors) the
weighted mean sum_i w_i tau_i / sum_i w_i (the papers' mean when the weights are equal) or, for
SVC, the scaled weighted sum. The merge's `lambda` then scales every tensor, as the papers' alpha.

Models' weights. TSV-M, Iso-*, SVC: model i contributes w_i tau_i (so weights of 1 are the
papers' algorithms). WUDI: w_i weighs model i's term of the objective (as RegMean's weights
weigh the Grams), so one model alone gives its own task vector whatever its weight.

Numerical rank. A singular value at or below `eps * max(m, n) * scale` (fp32 eps; scale = the
largest singular value of the matrix decomposed, or the Frobenius norm of the task vector a
residual came from) is treated as zero, as numpy's `matrix_rank` does. Singular vectors of such
values are arbitrary (any rotation of a null space is a valid SVD), and the papers' code keeps
them: TSV-M stacks them before the orthogonalisation, Iso-* give them the mean singular value,
so a low-rank task vector (a LoRA) would get noise directions that depend on the LAPACK build.
Here they are left out; for full-rank inputs nothing changes (the results equal the papers'
code), for rank-deficient ones the result is the papers' result on the directions the tasks
span, without the arbitrary part. For the same reason the orthogonalisation is the polar factor
of the numerical-rank part, U_p V_p^T (p = numerical rank), the unique partial isometry
X (X^T X)^{+1/2}; for a full-rank X it is the usual U V^T.

Precision: SVDs are `torch.linalg.svd(full_matrices=False)` in fp32, except TSV-M's (fp64, see
there); WUDI's solve is fp64; the rank tolerance uses fp32's eps whatever the precision, since the
task vectors arrive in fp32. Determinism: every result is invariant to the signs of singular
vector pairs (U S V^T, U V^T and u_k^T X are, pair by pair), so it does not depend on the
LAPACK/cuSOLVER sign convention. Cost: one SVD per task matrix (TSV-M, Iso-CTS) plus one of the
sum (Iso-*, SVC) and two of the stacked bases (TSV-M, Iso-CTS); WUDI instead builds and factors
an in x in fp64 Gram. A 4096 x 11008 fp32 SVD took 119 s on this machine's 2 shared CPU cores
(torch 2.13; 2048 x 5504: 35 s).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

from .table import LAMBDA, Param, register_method

EPS = torch.finfo(torch.float32).eps


def _floats(weights: torch.Tensor | Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0] * n
    return [float(w) for w in (weights.tolist() if isinstance(weights, torch.Tensor) else weights)]


def _weighted_sum(taus: Sequence[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """sum_i w_i tau_i in fp32, accumulated in place (no scaled copies)."""
    total = torch.zeros(taus[0].shape, dtype=torch.float32, device=taus[0].device)
    for t, w in zip(taus, weights):
        total.add_(t, alpha=w)
    return total


def _tolerance(shape: Sequence[int], scale: float) -> float:
    """Singular values at or below this are zero (numpy's matrix_rank rule, fp32)."""
    return EPS * max(shape) * scale


def _rank(s: torch.Tensor, tol: float) -> int:
    return int((s > tol).sum())


def svd(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD in `dtype`: x = U diag(S) Vh, S descending.

    LAPACK's divide-and-conquer SVD (gesdd, torch's only CPU driver) can fail to converge on
    matrices with many clustered singular values, and whether it does depends on the thread count
    and the BLAS build: a stack of near-orthonormal bases (Iso-CTS's, TSV-M's) is exactly such a
    matrix, and it failed once in 272 layers of a 135M model. The same matrix is then decomposed in
    fp64, and if that fails too, through the eigendecomposition of its fp64 Gram (`_svd_by_eigh`)."""
    try:
        return torch.linalg.svd(x.to(dtype), full_matrices=False)
    except torch.linalg.LinAlgError:
        wide = x.to(torch.float64)
    try:
        u, s, vh = torch.linalg.svd(wide, full_matrices=False)
    except torch.linalg.LinAlgError:
        u, s, vh = _svd_by_eigh(wide)
    return u.to(dtype), s.to(dtype), vh.to(dtype)


def _svd_by_eigh(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD from eigh(x^T x) (x has at least as many rows as columns, else its transpose is
    decomposed): V and S^2 from the Gram, U = x V / S on the numerical rank, completed to
    orthonormal columns by a QR with the identity. Singular values below sqrt(eps) * S_max lose
    relative precision here (they are squared), which the rank tolerance and the methods tolerate
    (they use the leading directions); it is the last resort after gesdd failed in fp32 and fp64."""
    if x.shape[0] < x.shape[1]:
        u, s, vh = _svd_by_eigh(x.T)
        return vh.T, s, u.T
    values, v = torch.linalg.eigh(x.T @ x)
    s, v = values.flip(0).clamp_min(0).sqrt(), v.flip(1)
    p = _rank(s, _tolerance(x.shape, float(s[0]) if s.numel() else 0.0))
    u = x @ v[:, :p] / s[:p]
    if p < s.numel():  # the null directions: any orthonormal completion is a valid SVD
        q, _ = torch.linalg.qr(torch.cat([u, torch.eye(x.shape[0], dtype=x.dtype, device=x.device)], dim=1))
        u = torch.cat([u, q[:, p:s.numel()]], dim=1)
    return u, s, v.T


def polar(x: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor of x (in x's precision): U_p Vh_p over its numerical rank p (the
    nearest matrix with orthonormal columns, or rows, when x has full rank: orthogonal Procrustes)."""
    u, s, vh = svd(x, x.dtype if x.dtype == torch.float64 else torch.float32)
    p = _rank(s, _tolerance(x.shape, float(s[0]) if s.numel() else 0.0))
    return u[:, :p] @ vh[:p]


def weighted_mean(taus: Sequence[torch.Tensor], weights: torch.Tensor | Sequence[float] | None = None) -> torch.Tensor:
    """sum_i w_i tau_i / sum_i w_i: the papers' mean for tensors that are not layer matrices."""
    w = _floats(weights, len(taus))
    total = sum(w)
    if total == 0:
        raise ValueError("the models' weights sum to 0: their mean is undefined")
    return _weighted_sum(taus, w).div_(total)


# -- TSV-M -----------------------------------------------------------------------------------------
def tsv_merge(taus: Sequence[torch.Tensor], weights: torch.Tensor | Sequence[float] | None = None,
              rank_fraction: float | None = None) -> torch.Tensor:
    """Task Singular Vectors merge, TSV-M (Gargiulo et al., CVPR 2025; code: AntoAndGar/
    task_singular_vectors, `compute_and_sum_svd_mem_reduction`).

    For T task matrices t_i = w_i tau_i (m x n, r = min(m, n)):
      1. t_i = U_i S_i V_i^T; keep each task's top k = floor(r * rank_fraction) singular triplets,
         k = floor(r / T) by default (the paper's 1/T of the rank; at least 1);
      2. stack them: U = [U_1k ... U_Tk] (m x Tk), S = diag(S_1k ... S_Tk), V = [V_1k ... V_Tk];
      3. decorrelate: U_perp = P Q^T from U = P Sigma Q^T (the polar factor: the matrix with
         orthonormal columns nearest U), V_perp likewise;
      4. merged = U_perp S V_perp^T (the paper then scales it by alpha, 1.0: `lambda` here).
    Singular triplets with numerically zero values are not kept (see the module doc). With a
    single task the result is its rank-k truncation.

    In fp64 (returned in fp32): tasks that share directions -- the case TSV-M is for -- stack
    nearly parallel basis vectors, and the polar factor amplifies rounding by 1 / sigma_min of
    the stack (0.004 in the tests: fp32 SVDs were 1e-4 off, fp64 ones 1e-13).
    """
    w = _floats(weights, len(taus))
    scaled = [t.to(torch.float64) * wi for t, wi in zip(taus, w)]
    m, n = scaled[0].shape
    r = min(m, n)
    k = max(1, math.floor(r * rank_fraction) if rank_fraction else r // len(taus))
    us, ss, vhs = [], [], []
    for t in scaled:
        u, s, vh = svd(t, torch.float64)
        keep = min(k, _rank(s, _tolerance(t.shape, float(s[0]))))
        us.append(u[:, :keep])
        ss.append(s[:keep])
        vhs.append(vh[:keep])
    s = torch.cat(ss)
    if s.numel() == 0:  # every task vector is zero
        return torch.zeros(m, n, dtype=torch.float32, device=scaled[0].device)
    return ((polar(torch.cat(us, dim=1)) * s) @ polar(torch.cat(vhs, dim=0))).float()


# -- Iso-C / Iso-CTS ---------------------------------------------------------------------------------
def iso_c(taus: Sequence[torch.Tensor], weights: torch.Tensor | Sequence[float] | None = None) -> torch.Tensor:
    """Isotropic merging in the common subspace, Iso-C (Marczak et al., ICML 2025; code:
    danielm1405/iso-merging, `src/utils/iso.py`).

    M = sum_i w_i tau_i = U diag(s) V^T; merged = mean(s) U V^T: the task-arithmetic sum with its
    spectrum made flat. mean(s) is over all r = min(m, n) singular values, as in the paper's code;
    the directions are those of M's numerical rank (all of them for a full-rank sum).
    """
    total = _weighted_sum(taus, _floats(weights, len(taus)))
    u, s, vh = svd(total)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return torch.zeros_like(total)
    p = _rank(s, _tolerance(total.shape, float(s[0])))
    return (u[:, :p] * s.mean()) @ vh[:p]


def iso_cts_split(r: int, tasks: int, common_fraction: float) -> tuple[int, int]:
    """(common dimensions k, task-specific dimensions per task) for rank r, as Iso-CTS' code sizes
    them: k = int(r * fraction), then the remainder is rounded to a multiple of the task count
    (Python's round, half to even) and k takes the rest. Where that multiple would exceed r (only
    for fractions near 0) it is floor(r / T) * T instead."""
    k = int(r * common_fraction)
    per_task = round((r - k) / tasks)
    if per_task * tasks > r:
        per_task = r // tasks
    return r - per_task * tasks, per_task


def iso_cts(taus: Sequence[torch.Tensor], weights: torch.Tensor | Sequence[float] | None = None,
            common_fraction: float = 0.8) -> torch.Tensor:
    """Isotropic merging in common and task-specific subspaces, Iso-CTS (Marczak et al., ICML 2025;
    code: danielm1405/iso-merging, `iso_cts`).

    With t_i = w_i tau_i, M = sum_i t_i and (k, d) = `iso_cts_split(r, T, common_fraction)`:
      1. common subspace: the top k singular triplets of M (U_c, s_c, V_c);
      2. task-specific: each task's residual off the common left subspace,
         R_i = t_i - U_c U_c^T t_i, contributes its top d singular triplets (U_i, s_i, V_i);
      3. U = polar([U_1 .. U_T, U_c]), V = polar([V_1 .. V_T, V_c]) (orthogonalised, as TSV-M);
      4. merged = sigma U V^T, sigma = the mean of the r selected singular values (s_c and the s_i):
         an isotropic spectrum again.
    The projection is on the output side (U), as in the paper's code on out x in weights.
    `common_fraction` = 1 gives Iso-C. Numerically zero singular values are left out of the
    directions (not out of the mean), see the module doc.
    """
    w = _floats(weights, len(taus))
    total = _weighted_sum(taus, w)
    r = min(total.shape)
    k, d = iso_cts_split(r, len(taus), common_fraction)
    u, s, vh = svd(total)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return torch.zeros_like(total)
    kc = min(k, _rank(s, _tolerance(total.shape, float(s[0]))))
    u_c = u[:, :kc]
    us, vhs = [], []
    selected = s[:k].sum()
    for tau, wi in zip(taus, w):
        if d == 0:
            break
        t = tau.float() * wi
        residual = t - u_c @ (u_c.T @ t)
        u_t, s_t, vh_t = svd(residual)
        selected = selected + s_t[:d].sum()
        keep = min(d, _rank(s_t, _tolerance(t.shape, float(torch.linalg.matrix_norm(t)))))
        us.append(u_t[:, :keep])
        vhs.append(vh_t[:keep])
    sigma = selected / r
    return polar(torch.cat([*us, u_c], dim=1)).mul_(sigma) @ polar(torch.cat([*vhs, vh[:kc]], dim=0))


# -- WUDI ------------------------------------------------------------------------------------------
def wudi_system(taus: Sequence[torch.Tensor], weights: torch.Tensor | Sequence[float] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(G, B, S) in fp64 for WUDI's normal equations X G = B: with c_i = w_i / |tau_i|_F^2,
    G = sum_i c_i tau_i^T tau_i (in x in), B = sum_i c_i tau_i tau_i^T tau_i (out x in), and
    S = sum_i w_i tau_i, the sum the paper's optimiser starts from. Zero task vectors (and zero
    weights) add nothing."""
    w = _floats(weights, len(taus))
    n = taus[0].shape[1]
    device = taus[0].device
    gram = torch.zeros(n, n, dtype=torch.float64, device=device)
    rhs = torch.zeros(taus[0].shape, dtype=torch.float64, device=device)
    start = torch.zeros_like(rhs)
    for tau, wi in zip(taus, w):
        t = tau.to(torch.float64)
        norm2 = float(t.square().sum())
        start.add_(t, alpha=wi)
        if norm2 == 0.0 or wi == 0.0:
            continue
        c = wi / norm2
        gram.addmm_(t.T, t, alpha=c)
        # tau tau^T tau, in the cheaper order: (m x m) then m x n, or m x n times (n x n)
        rhs.addmm_(t @ t.T, t, alpha=c) if t.shape[0] <= t.shape[1] else rhs.addmm_(t, t.T @ t, alpha=c)
    return gram, rhs, start


def wudi(taus: Sequence[torch.Tensor], weights: torch.Tensor | Sequence[float] | None = None,
         damp: float = 0.01) -> torch.Tensor:
    """WUDI-Merging (Cheng et al., ICML 2025, "Whoever Started the Interference Should End It";
    code: nathanielyvo/WUDI-Merging, also fusion_bench `method/WUDI/wudi.py`), closed form.

    The paper's objective per linear layer, the task vectors' own rows standing in for inputs:

        min_X  sum_i w_i / |tau_i|_F^2 * |(X - tau_i) tau_i^T|_F^2

    (the code runs Adam, lr 1e-5, 300 steps, from X = sum_i tau_i). Its gradient vanishes where
    X G = B (`wudi_system`), the normal equations, solved here directly in fp64 with Tikhonov
    damping towards the optimiser's start S:

        X (G + delta I) = B + delta S,        delta = damp * mean(diag G)

    i.e. the minimiser of the objective plus (delta / 2) |X - S|_F^2. G is singular whenever the
    tasks' rows do not span the input space (always, for low-rank or LoRA task vectors); there the
    objective does not determine X, and the damping keeps the start's component (which is the
    optimiser's answer too: its gradient has no component there). Nearly singular directions are
    the real hazard: task vectors' spectra decay fast, G's eigenvalues are their squares, and the
    undamped minimiser blows up along the weakest ones. On synthetic low-rank tasks (4 tasks,
    128 x 256, spectra decaying as exp(-k/6)) damp 1e-8 put the merge 90 norms of the sum away
    from the sum; damp 1e-2 put it 0.71 of that norm from the sum and 0.54 from the paper's 300
    Adam steps, with an objective below Adam's (5.8e-6 vs 9.4e-6; the sum's: 1.2e-3). Hence the
    default 0.01, RegMean's relative damping. Returned in fp32.
    """
    gram, rhs, start = wudi_system(taus, weights)
    n = gram.shape[0]
    delta = damp * float(torch.diagonal(gram).sum()) / n
    if delta == 0.0:  # every task vector is zero
        return start.float()
    gram.diagonal().add_(delta)  # G + delta I, in place: G is the largest temporary (in x in, fp64)
    target = rhs.add_(start, alpha=delta)
    factor = torch.linalg.cholesky(gram)
    return torch.cholesky_solve(target.T, factor).T.float()


# -- SVC -------------------------------------------------------------------------------------------
def svc(taus: Sequence[torch.Tensor], weights: torch.Tensor | Sequence[float] | None = None,
        alpha: float | None = None, scale: float = 1.0) -> torch.Tensor:
    """Singular value calibration of the task-arithmetic merge (Li et al. 2026, "When Shared
    Knowledge Hurts: Spectral Over-Accumulation in Model Merging", arXiv:2602.05536; the authors'
    code: lyymuwu/SVC, `merge_func.py`: `Align` / `coef_cal_multi_ranks`, which this follows).

    With t_i = w_i tau_i, the merge M = scale * sum_i t_i = sum_r sigma_r u_r v_r^T:
      1. responses along each left singular vector: a_r = u_r^T M, a_ri = u_r^T t_i;
      2. projection coefficients s_ri = <a_r, a_ri> / max(|a_ri|^2, 1e-12): how many times the
         merge carries task i's response along u_r (K tasks sharing a direction equally: K * scale);
      3. eta_r = max(mean_i s_ri, alpha) where every s_ri > 0, else 1 (no calibration where some
         task opposes the merge along u_r);
      4. calibrated = sum_r (sigma_r / eta_r) u_r v_r^T.
    alpha (None: 1/K, the authors' scripts for task arithmetic) bounds the rescale: a value grows
    at most 1/alpha times; with alpha >= 1 none grows. The paper's text writes
    eta_r = mean_i max(alpha, s_ri) (as fusion_bench's port); the code, used here, takes the max
    after the mean and skips directions with a negative coefficient.
    """
    w = _floats(weights, len(taus))
    merged = _weighted_sum(taus, w).mul_(scale)
    if scale == 0.0:
        return merged
    u, s, vh = svd(merged)
    a_merged = s[:, None] * vh  # u_r^T M
    coefficients = []
    for tau, wi in zip(taus, w):
        a = (u.T @ tau.float()).mul_(wi)  # u_r^T (w_i tau_i)
        coefficients.append((a_merged * a).sum(dim=1) / a.square().sum(dim=1).clamp_min(1e-12))
    coef = torch.stack(coefficients, dim=1)  # r x K
    floor = 1.0 / len(taus) if alpha is None else alpha
    eta = torch.where((coef > 0).all(dim=1), coef.mean(dim=1).clamp_min(floor), torch.ones_like(s))
    return (u * (s / eta)) @ vh


# -- methods ---------------------------------------------------------------------------------------
def _matrix(trimmed: Sequence[torch.Tensor], linear: bool) -> bool:
    return linear and trimmed[0].dim() == 2


def _mean_defined(params: Mapping, weights: Sequence[float]) -> None:
    if sum(weights) <= 0:
        raise ValueError(f"weight: the models' weights sum to {sum(weights):g}; tensors that are not layer "
                         "matrices take their weighted mean, which needs a positive sum")


def _wudi_weights(params: Mapping, weights: Sequence[float]) -> None:
    if any(w < 0 for w in weights):
        raise ValueError("weight: wudi weighs each model's term of its objective; weights must be >= 0")
    _mean_defined(params, weights)


RANK_FRACTION = Param("rank_fraction", float, 0.0, "tsv: fraction of each task matrix's rank kept; 0: 1/T for T "
                      "models (the paper)", low=0.0, high=1.0, schedulable=True)
COMMON_FRACTION = Param("common_fraction", float, 0.8, "iso_cts: fraction of the rank given to the common subspace "
                        "of the summed matrix (the paper's 0.8; 1 gives iso_c)", low=0.0, high=1.0, schedulable=True)
WUDI_DAMP = Param("damp", float, 0.01, "wudi: damping of the closed-form solve towards the task-arithmetic sum, "
                  "relative to mean(diag G)", low=0.0, high=10.0, low_open=True)
SVC_ALPHA = Param("alpha", float, 0.0, "svc: floor of each singular value's divisor (a value grows at most "
                  "1/alpha times); 0: 1/K for K models (the authors' setting)", low=0.0, high=100.0,
                  schedulable=True)
SVC_SCALE = Param("scale", float, 0.3, "svc: task-arithmetic coefficient of the merge that is calibrated "
                  "(scale * sum_i w_i tau_i; the authors' 0.3)", low=-100.0, high=100.0, schedulable=True)


@register_method("tsv", params=(RANK_FRACTION, LAMBDA), elementwise=False, check=_mean_defined)
def tsv_method(trimmed, weights, *, params, linear=False, **_):
    """TSV-M (Gargiulo et al. 2025): each task matrix's top singular vectors, decorrelated by
    orthogonal Procrustes, rebuilt with their singular values; other tensors: weighted mean."""
    if _matrix(trimmed, linear):
        return tsv_merge(trimmed, weights, params["rank_fraction"] or None)
    return weighted_mean(trimmed, weights)


@register_method("iso_c", params=(LAMBDA,), elementwise=False, check=_mean_defined)
def iso_c_method(trimmed, weights, *, params, linear=False, **_):
    """Iso-C (Marczak et al. 2025): the summed task matrix with a flat spectrum (every singular
    value their mean); other tensors: weighted mean. The paper picks lambda on validation data
    (lambda: auto)."""
    if _matrix(trimmed, linear):
        return iso_c(trimmed, weights)
    return weighted_mean(trimmed, weights)


@register_method("iso_cts", params=(COMMON_FRACTION, LAMBDA), elementwise=False, check=_mean_defined)
def iso_cts_method(trimmed, weights, *, params, linear=False, **_):
    """Iso-CTS (Marczak et al. 2025): the sum's top subspace plus each task's own directions off
    it, orthogonalised, with a flat spectrum; other tensors: weighted mean."""
    if _matrix(trimmed, linear):
        return iso_cts(trimmed, weights, params["common_fraction"])
    return weighted_mean(trimmed, weights)


@register_method("wudi", params=(WUDI_DAMP, LAMBDA), elementwise=False, check=_wudi_weights)
def wudi_method(trimmed, weights, *, params, linear=False, **_):
    """WUDI (Cheng et al. 2025): per linear layer, the merge that minimises each task's
    interference on its own task vector's rows (closed form); other tensors: weighted mean."""
    if _matrix(trimmed, linear):
        return wudi(trimmed, weights, params["damp"])
    return weighted_mean(trimmed, weights)


@register_method("svc", params=(SVC_SCALE, SVC_ALPHA, LAMBDA), elementwise=False)
def svc_method(trimmed, weights, *, params, linear=False, **_):
    """Task arithmetic, then singular value calibration (Li et al. 2026): shrink the singular
    values that several tasks' shared directions inflated; other tensors: scale * weighted sum."""
    if _matrix(trimmed, linear):
        return svc(trimmed, weights, params["alpha"] or None, params["scale"])
    return _weighted_sum(trimmed, _floats(weights, len(trimmed))).mul_(params["scale"])
