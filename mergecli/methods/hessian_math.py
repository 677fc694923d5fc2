"""Math that uses calibration statistics: G = H / n = (1/n) sum x x^T over a layer's inputs.

Pure tensor functions, weights oriented out x in (rows = output features, columns = inputs).
All factorizations run in fp64.

Damping: G + delta * mean(diag G) * I (delta = 0.01 by default, as in SparseGPT). If the Cholesky
factorization still fails, delta is multiplied by 10 and retried (up to 1.0); there is never a
silent pseudo-inverse. Dead inputs (G_jj = 0: the input never fires on the calibration data) get
only the damping on their diagonal, so their [G^-1]_jj is large and their entries rank lowest:
the data gives no evidence they matter. If every input is dead the statistics are unusable and
`DegenerateStatistics` is raised so the caller can fall back to magnitude.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

from .sparsify import topk_mask


class DegenerateStatistics(ValueError):
    """G has no positive diagonal entry; no data-aware score exists for this layer."""


def damped_cholesky(gram: torch.Tensor, damp: float = 0.01) -> tuple[torch.Tensor, float]:
    """Lower Cholesky factor of the damped G (fp64) and the damping that succeeded."""
    g = gram.to(torch.float64)
    mean_diag = torch.diagonal(g).mean()
    if not mean_diag > 0:
        raise DegenerateStatistics("all inputs are dead (diag of H is zero)")
    delta = damp
    while True:
        damped = g.clone()
        damped.diagonal().add_(delta * mean_diag)
        factor, info = torch.linalg.cholesky_ex(damped)
        del damped
        if int(info) == 0:
            return factor, delta
        if delta >= 1.0:
            raise DegenerateStatistics(f"H is not positive definite even with damping {delta}")
        delta *= 10


def inverse_diagonal(gram: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """[G_damped^-1]_jj: the diagonal of the inverse (not of its Cholesky factor)."""
    factor, _ = damped_cholesky(gram, damp)
    return torch.diagonal(torch.cholesky_inverse(factor)).clone()


def obs_saliency(tau: torch.Tensor, hinv_diag: torch.Tensor) -> torch.Tensor:
    """SparseGPT / OBS saliency tau_ij^2 / [H^-1]_jj: the loss increase of zeroing entry ij alone."""
    return tau.to(torch.float64).pow(2) / hinv_diag.unsqueeze(0)


def wanda_score(tau: torch.Tensor, gram_diag: torch.Tensor) -> torch.Tensor:
    """Wanda: |tau_ij| * ||X_j|| / sqrt(n) = |tau_ij| * sqrt(G_jj)."""
    return tau.abs().to(torch.float64) * gram_diag.clamp(min=0).sqrt().unsqueeze(0)


def obs_trim(tau: torch.Tensor, gram: torch.Tensor, density: float, damp: float = 0.01,
             block: int = 128) -> torch.Tensor:
    """SparseGPT's blockwise column sweep applied to a task vector.

    Keeps `density` of each block of columns (exact count, chosen by the OBS saliency with the
    running inverse-Cholesky diagonal, which is the right quantity *inside* the sequential sweep)
    and updates the not-yet-visited entries to compensate, minimising ||X (tau - tau')^T||^2.
    """

    w = tau.to(torch.float64).clone()
    factor, _ = damped_cholesky(gram, damp)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(factor), upper=True)
    cols = w.shape[1]
    for start in range(0, cols, block):
        end = min(start + block, cols)
        w1 = w[:, start:end].clone()
        h1 = hinv[start:end, start:end]
        d = torch.diagonal(h1)
        keep = topk_mask(w1.pow(2) / d.pow(2).unsqueeze(0), density)
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        for i in range(end - start):
            col = w1[:, i]
            q = torch.where(keep[:, i], col, torch.zeros_like(col))
            q1[:, i] = q
            err = (col - q) / d[i]
            w1[:, i:] -= err.unsqueeze(1) * h1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, start:end] = q1
        w[:, end:] -= err1 @ hinv[start:end, end:]
    return w.to(tau.dtype)


def regmean_delta(taus: Sequence[torch.Tensor], grams: Iterable[torch.Tensor], weights: torch.Tensor,
                  alpha: float = 0.9, fresh: bool = False) -> torch.Tensor:
    """RegMean on task vectors: (sum_i w_i tau_i G~_i)(sum_i w_i G~_i)^-1, G~ = alpha G + (1-alpha) diag G.

    Equal to W* - W_base for W* = (sum w_i W_i G~_i)(sum w_i G~_i)^-1 with W_i = W_base + tau_i,
    because W_base (sum G~)(sum G~)^-1 = W_base. `grams` may be a generator: one G is alive at a
    time, and G~ and the sum are built in place, so the peak is the sum, one G~ and the solve's
    factor (three fp64 in x in matrices) rather than six: gigabytes at 7B widths. `fresh`: each G
    is made for this call (`LayerStats.gram`) and may become G~ where it lies -- one fp64 in x in
    (0.97 GB at an 11,008-wide input) fewer than a copy.
    """
    return regmean_deltas(taus, [None], grams, weights, alpha, fresh)[0]


def regmean_deltas(taus: Sequence[torch.Tensor], scalings: Sequence[Sequence[float] | None],
                   grams: Iterable[torch.Tensor], weights: torch.Tensor, alpha: float = 0.9,
                   fresh: bool = False) -> list[torch.Tensor]:
    """`regmean_delta` with tau_i times `scalings[p][i]` (None: 1), for every p at once: the Gram
    sum does not depend on the scales, so it is built and factored once and each merge is one more
    right-hand side (`lambda: learned` scores each fine-tune's part alone: at 7B widths one
    factorization of an 11,008-wide down projection instead of one per fine-tune). A scale of 0
    adds nothing and is skipped."""
    total = None
    rhs: list[torch.Tensor | None] = [None] * len(scalings)
    for i, (tau, gram, w) in enumerate(zip(taus, grams, weights.tolist())):
        g_tilde = gram if fresh and gram.dtype == torch.float64 else gram.to(torch.float64, copy=True)
        del gram
        diagonal = torch.diagonal(g_tilde).clone()
        g_tilde.mul_(alpha).diagonal().add_(diagonal.mul_(1 - alpha))
        del diagonal
        for p, scales in enumerate(scalings):
            s = 1.0 if scales is None else scales[i]
            if s == 0.0:
                continue
            term = w * (tau if s == 1.0 else tau * s).to(torch.float64) @ g_tilde
            rhs[p] = term if rhs[p] is None else rhs[p].add_(term)
        total = g_tilde.mul_(w) if total is None else total.add_(g_tilde.mul_(w))
        del g_tilde
    # delta @ total = rhs  <=>  total delta^T = rhs^T (total is symmetric); dead inputs make total
    # singular, so a failed factorization is replaced by the same damping rule as the scores'.
    lu, pivots, info = torch.linalg.lu_factor_ex(total)
    factor = damped_cholesky(total)[0] if int(info) != 0 else None
    del total
    out = []
    for r in rhs:
        if r is None:
            out.append(torch.zeros_like(taus[0]))
            continue
        solution = torch.linalg.lu_solve(lu, pivots, r.T) if factor is None else torch.cholesky_solve(r.T, factor)
        out.append(solution.T.to(taus[0].dtype))
    return out


def count_weighted_delta(taus: Sequence[torch.Tensor], freqs: Sequence[torch.Tensor],
                         weights: torch.Tensor, block: int = 1 << 20) -> torch.Tensor:
    """RegMean for an embedding lookup (rows = tokens): row v of the merged delta is
    sum_i w_i c_iv tau_iv / sum_i w_i c_iv, c_iv = model i's frequency of token v.

    Why: a lookup's input is one-hot, so its Gram G_i = X_i^T X_i / n_i is diag(c_i), and
    RegMean's (sum w_i tau_i G_i)(sum w_i G_i)^-1 becomes this per-row mean; the dense V x V
    matrix never exists. A row no model's calibration data contains has no data term at all and
    keeps the weighted mean (what the limit of equal counts gives), never 0/0.

    Rows are independent, so they are computed `block` entries at a time: the fp64 terms of a
    7B embedding (32,000 x 4,096) would be ~5 GB at once, a block's are a few MB.
    """
    w = weights.tolist()
    den = sum(wi * c.to(torch.float64) for c, wi in zip(freqs, w))
    seen = den != 0
    safe = torch.where(seen, den, 1.0)
    total = float(weights.sum())
    out = torch.empty(taus[0].shape, dtype=taus[0].dtype, device=taus[0].device)
    step = max(1, block // max(1, taus[0][0].numel()))
    for start in range(0, out.shape[0], step):
        rows = slice(start, start + step)
        num = sum(wi * c[rows].to(torch.float64).unsqueeze(1) * t[rows].to(torch.float64)
                  for t, c, wi in zip(taus, freqs, w))
        mean = sum(wi * t[rows].to(torch.float64) for t, wi in zip(taus, w)) / total
        out[rows] = torch.where(seen[rows].unsqueeze(1), num / safe[rows].unsqueeze(1), mean)
    return out
