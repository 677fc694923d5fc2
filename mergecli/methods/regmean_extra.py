"""RegMean for the tensors that plain RegMean leaves to a mean: embeddings, a tied embedding/lm_head
matrix, and the norm vectors in front of linear layers.

Pure tensor functions (no I/O); all solves in fp64; task-vector form throughout (delta = merged -
base), weights `w_i` per model. Notation: V = vocabulary, d = hidden size.

Why these exist. RegMean (Jin et al. 2023) merges a linear layer W by minimising
sum_i w_i ||X_i W^T - X_i W_i^T||^2 over each model's own inputs X_i; its closed form needs only the
Gram G_i = X_i^T X_i / n_i. The same objective has a closed form for three more kinds of tensor:

* Embedding lookup. Its input is a one-hot token, so its Gram is diagonal: C_i = diag(c_i / n_i),
  c_i the token counts of model i's calibration data. RegMean's solution is then a per-row
  count-weighted mean: delta_v = sum_i w_i c_iv tau_iv / sum_i w_i c_iv (`count_weighted_delta`).
* Tied embedding / lm_head (SmolLM2, GPT-2, BLOOM). One matrix E (V x d) is both the lookup and
  the output layer, whose input is the final hidden state with Gram G_i (d x d). The sum of the two
  objectives, beta * sum_i w_i tr((E - E_i)^T C_i (E - E_i)) + sum_i w_i tr((E - E_i) G~_i (E - E_i)^T),
  is stationary where
      beta * C Delta + Delta G = R,   C = sum_i w_i C_i (diagonal), G = sum_i w_i G~_i,
      R = sum_i w_i (beta C_i tau_i + tau_i G~_i),
  a Sylvester equation with one diagonal side. With G = Q diag(lam) Q^T,
      Delta = [ (R Q) / (beta c_v + lam_j) ]_vj Q^T
  one eigendecomposition of a d x d matrix and elementwise work on V x d (`tied_embedding_delta`).
  A row no calibration token hit (c_v = 0) gets the lm_head-only RegMean row.
* Norm vectors (RMSNorm / LayerNorm scale g feeding linear layers W). The consumer sees
  x^ diag(g) W^T with x^ the normalized input, so the product V = W diag(g) is what the data
  constrains. Merging the folded V_i = W_i diag(g_i) with the Grams of x^ (G^_i = D_i^-1 G_i D_i^-1)
  is RegMean on the product, and any non-zero g then gives an exact split W = V diag(1/g)
  (`folded_regmean`). For a norm whose consumer cannot absorb g (the final norm in front of a tied
  lm_head), the least-squares g for a fixed merged W* is
      g* = [sum_i w_i G^_i o (W*^T W*)]^-1 sum_i w_i (G^_i o (W*^T W_i)) g_i
  (o: elementwise product; the left matrix is PSD by the Schur product theorem) (`norm_given_weights`).
"""

from __future__ import annotations

from typing import Sequence

import torch

from .hessian_math import damped_cholesky, regmean_delta


def shrink(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """RegMean's G~ = alpha G + (1 - alpha) diag(G), in fp64."""
    g = gram.to(torch.float64)
    return alpha * g + (1 - alpha) * torch.diag(torch.diagonal(g))


def count_weighted_delta(taus: Sequence[torch.Tensor], counts: Sequence[torch.Tensor], weights: torch.Tensor,
                         prior: float = 0.0) -> torch.Tensor:
    """RegMean for an embedding lookup: row v of the merged delta is sum_i w_i c_iv tau_iv / sum_i w_i c_iv.

    `counts[i]` are token frequencies (counts / n_i, or raw counts: only ratios between models
    matter per row, so use the same normalization for all). `prior` is added to every frequency;
    with prior = 0 a row no model's data contains falls back to the weighted mean (the
    prior -> infinity limit), never to 0/0.
    """
    num = None
    den = None
    for tau, c, w in zip(taus, counts, weights.tolist()):
        cw = w * (c.to(torch.float64) + prior)
        term = tau.to(torch.float64) * cw.unsqueeze(1)
        num = term if num is None else num + term
        den = cw if den is None else den + cw
    mean = sum(w * t.to(torch.float64) for t, w in zip(taus, weights.tolist())) / float(weights.sum())
    unseen = den <= 0
    out = num / torch.where(unseen, torch.ones_like(den), den).unsqueeze(1)
    out[unseen] = mean[unseen]
    return out.to(taus[0].dtype)


def tied_embedding_delta(taus: Sequence[torch.Tensor], counts: Sequence[torch.Tensor],
                         grams: Sequence[torch.Tensor], weights: torch.Tensor, alpha: float = 0.9,
                         beta: float = 1.0, damp: float = 1e-6) -> torch.Tensor:
    """Closed-form RegMean for a tied embedding / lm_head matrix (V x d): solves
    beta C Delta + Delta G = R (see the module docstring) in the eigenbasis of G.

    `counts[i]`: token frequencies of model i's calibration inputs (c_iv / n_i); `grams[i]`: the
    Gram of its final hidden states divided by its token count (d x d). `beta` weighs the lookup
    objective against the output-layer objective (both are per-token sums of squared errors).
    Eigenvalues of G below damp * mean(diag G) are raised to it so that rows with c_v = 0 stay
    finite (a dead hidden direction gets no update from them, as in damped RegMean).
    """
    g_sum = None
    rhs = None
    c_sum = None
    for tau, c, gram, w in zip(taus, counts, grams, weights.tolist()):
        t = tau.to(torch.float64)
        g = shrink(gram, alpha)
        cw = w * c.to(torch.float64)
        g_sum = w * g if g_sum is None else g_sum + w * g
        c_sum = cw if c_sum is None else c_sum + cw
        term = w * (t @ g) + beta * cw.unsqueeze(1) * t
        rhs = term if rhs is None else rhs + term
    lam, q = torch.linalg.eigh(g_sum)
    floor = damp * float(torch.diagonal(g_sum).mean())
    lam = lam.clamp(min=floor)
    f = (rhs @ q) / (beta * c_sum.unsqueeze(1) + lam.unsqueeze(0))
    return (f @ q.T).to(taus[0].dtype)


def folded_regmean(taus: Sequence[torch.Tensor], base: torch.Tensor, scales: Sequence[torch.Tensor],
                   base_scale: torch.Tensor, grams: Sequence[torch.Tensor], weights: torch.Tensor,
                   alpha: float = 0.9, merged_scale: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """RegMean of a linear layer W (out x d) together with the norm scale g in front of it.

    `grams[i]` are the Grams of the layer's actual input x^ * g_i in model i (what the hooks
    collect), `scales[i]` = g_i = base_scale + that model's norm task vector. Returns
    (delta of W, merged g): W* = V* diag(1/g*) with V* the RegMean merge of W_i diag(g_i) under
    the Grams of x^. `merged_scale` defaults to the weighted mean of the g_i; every consumer of one
    norm must be given the same g* (the split is exact for any g* without zeros).
    """
    w_list = weights.tolist()
    if merged_scale is None:
        merged_scale = sum(w * s.to(torch.float64) for s, w in zip(scales, w_list)) / float(weights.sum())
    g_star = merged_scale.to(torch.float64)
    if bool((g_star == 0).any()):
        raise ValueError("merged norm scale has zero entries: W = V diag(1/g) is undefined there")
    b = base.to(torch.float64)
    v_base = b * base_scale.to(torch.float64).unsqueeze(0)
    folded_taus = []
    hat_grams = []
    for tau, s, gram in zip(taus, scales, grams):
        s64 = s.to(torch.float64)
        folded_taus.append((b + tau.to(torch.float64)) * s64.unsqueeze(0) - v_base)
        safe = torch.where(s64 == 0, torch.ones_like(s64), s64)
        hat_grams.append(gram.to(torch.float64) / torch.outer(safe, safe))
    v_star = v_base + regmean_delta(folded_taus, hat_grams, weights, alpha)
    w_star = v_star / g_star.unsqueeze(0)
    return (w_star - b).to(taus[0].dtype), g_star.to(scales[0].dtype)


def norm_given_weights(merged: torch.Tensor, models: Sequence[torch.Tensor], scales: Sequence[torch.Tensor],
                       grams: Sequence[torch.Tensor], weights: torch.Tensor, damp: float = 1e-8) -> torch.Tensor:
    """Least-squares norm scale g for a fixed merged consumer `merged` (out x d):
    argmin_g sum_i w_i ||X^_i diag(g) merged^T - X^_i diag(g_i) W_i^T||^2, with `models[i]` = W_i,
    `scales[i]` = g_i and `grams[i]` the Gram of X^_i diag(g_i) (what a hook on the consumer sees).
    """
    m = merged.to(torch.float64)
    mtm = m.T @ m
    lhs = None
    rhs = None
    for wm, s, gram, w in zip(models, scales, grams, weights.tolist()):
        s64 = s.to(torch.float64)
        safe = torch.where(s64 == 0, torch.ones_like(s64), s64)
        hat = gram.to(torch.float64) / torch.outer(safe, safe)
        a = w * hat * mtm
        lhs = a if lhs is None else lhs + a
        term = w * (hat * (m.T @ wm.to(torch.float64))) @ s64
        rhs = term if rhs is None else rhs + term
    factor, _ = damped_cholesky(lhs, damp)
    return torch.cholesky_solve(rhs.unsqueeze(1), factor).squeeze(1).to(scales[0].dtype)
