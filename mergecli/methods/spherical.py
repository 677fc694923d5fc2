"""Spherical merges as mergekit 0.1.5 computes them: NuSLERP (two points on an arc), Multi-SLERP
(a barycentre in the tangent space at the points' mean direction) and the Karcher mean (the
Riemannian barycentre on the sphere, iterated).

The points are either the task vectors (`origin: base`, mergekit with a `base_model`: the result
is added to the base) or the weights themselves (`origin: zero`, mergekit without one): then the
base is one more point, the first, with weight `base_weight`, and the fine-tunes' weights are
rebuilt as base + tau. mergekit's Karcher mean always works on the weights and counts every input
(its `base_model` too) with equal weight, so `karcher` defaults to `origin: zero` and weight 1.

Each function transcribes mergekit's (`merge_methods/nuslerp.py`, `multislerp.py`, `karcher.py`):
the same operations in the same order, in fp32 (fp64 for fp64 inputs), so results agree to fp32
rounding; the rules for zero norms and (anti)parallel points are theirs and are spelled out in
each docstring. Reductions to one number go through `reduce` (blocks of fixed size), so results do
not depend on the thread count; on tensors of up to 16384 entries they are mergekit's own
operations, bit for bit. Tensors are oriented out x in; mergekit sees them as stored, which is the same
except for GPT-2's Conv1D weights (only `nuslerp_flatten: false` depends on it).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from .reduce import dot, last_norm, last_sum, norm
from .table import Param, means_stay_bounded, register_method


def _work(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.dtype == torch.float64 else tensor.float()


def nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, flatten: bool = True, row_wise: bool = False,
            eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation from v0 (t = 0) to v1 (t = 1) of the unnormalised tensors:

        (sin((1 - t) theta) v0 + sin(t theta) v1) / sin(theta),   cos theta = <v0, v1> / (|v0| |v1|)

    over the whole tensor (`flatten`), else per vector along the last dim (rows, out x in) or,
    with `row_wise`, along dim 0 (columns: mergekit's `nuslerp_row_wise` names it the other way
    round). Norms are clamped to >= 1e-7 (a zero vector gives cos = 0, theta = pi/2); only where
    1 - cos^2 <= eps^2 (cos = +-1 to fp32 precision) is it linear, (1 - t) v0 + t v1.
    """
    shape = v0.shape
    v0, v1 = _work(v0), _work(v1)
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    u0 = v0 / last_norm(v0).clamp(min=1e-7)
    u1 = v1 / last_norm(v1).clamp(min=1e-7)
    cos = last_sum(u0 * u1).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps ** 2
    theta = torch.acos(torch.where(colinear, 0, cos))
    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    result = torch.where(colinear, (1 - t) * v0 + t * v1, result)
    if row_wise and not flatten:
        result = result.transpose(0, -1)
    return result.reshape(shape)


def nuslerp_t(w0: float, w1: float) -> float:
    """mergekit's position from the two weights: w1 / (w0 + w1), 0.5 where |w0 + w1| < 1e-6."""
    total = w0 + w1
    return 0.5 if abs(total) < 1e-6 else w1 / total


def multislerp(points: Sequence[torch.Tensor], weights: Sequence[float], normalize_weights: bool = True,
               eps: float = 1e-8) -> torch.Tensor:
    """Barycentric interpolation on the sphere (each point a whole tensor, flattened):

    u_i = p_i / (|p_i| + eps); m = sum_i w_i u_i / |sum_i w_i u_i|; the tangent vectors
    u_i - <u_i, m> m are averaged with the weights, v = sum_i w_i (u_i - <u_i, m> m), and mapped back
    by the exponential map, m cos|v|' + v sin|v|' / |v|' with |v|' = |v| + eps; the result is
    scaled by sum_i w_i |p_i|. Weights are divided by their sum with `normalize_weights`. One point
    is returned as it is. Where |sum_i w_i u_i| < eps (antipodal points balancing out): two points
    give w_0 p_0 + w_1 p_1, more are an error (as in mergekit).
    """
    if len(points) == 1:
        return _work(points[0])
    stacked = torch.stack([_work(p) for p in points], dim=0)
    flat = stacked.view(stacked.shape[0], -1)
    w = torch.tensor(list(weights), dtype=stacked.dtype, device=stacked.device)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = norm(mean)
    if mean_norm < eps:
        if len(points) == 2:
            return (stacked[0] * w[0] + stacked[1] * w[1]).view(stacked.shape[1:])
        raise ValueError("multislerp: the weighted mean of the directions is zero (antipodal points whose weights "
                         "balance out); change the weights")
    mean = mean / mean_norm
    tangents = units - (units * mean).sum(-1, keepdim=True) * mean
    tangent = (tangents * w.view(-1, 1)).sum(0)
    length = norm(tangent) + eps
    result = mean * torch.cos(length) + tangent * (torch.sin(length) / length)
    return (result * (norms.squeeze(-1) * w).sum()).view(stacked.shape[1:])


def karcher(points: Sequence[torch.Tensor], alphas: Sequence[float], max_iter: int = 10,
            tol: float = 1e-5) -> torch.Tensor:
    """Weighted Karcher mean on the unit sphere, rescaled: sum_i alpha_i |p_i| * m, where m is the
    direction reached by `max_iter` Riemannian gradient steps from the normalised weighted mean of
    the directions (or the first direction if that mean is shorter than `tol`):

        v = sum_i a_i theta_i / sin(theta_i) (u_i - cos(theta_i) m),   theta_i = acos <m, u_i>,
        m <- cos|v| m + sin|v| v / |v|   (renormalised), stopping once |v| < tol;

    a_i = alpha_i / sum of the alphas of points with |p_i| > tol (the only points that steer m; a
    point with theta_i < tol adds nothing). All points at or below `tol` give zero. One point is
    returned as it is.
    """
    if len(points) == 1:
        return _work(points[0])
    tensors = [_work(p) for p in points]
    norms, units = [], []
    for tensor in tensors:
        length = norm(tensor)
        norms.append(length)
        units.append(torch.zeros_like(tensor) if length.item() == 0.0 else tensor / length)
    valid = [i for i, length in enumerate(norms) if length.item() > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    total = sum(alphas[i] for i in valid)
    steering = [(alphas[i] / total, units[i]) for i in valid]
    mean = torch.zeros_like(units[valid[0]])
    for a, unit in steering:
        mean += a * unit
    mean_norm = norm(mean)
    mean = units[valid[0]].clone() if mean_norm.item() < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for a, unit in steering:
            cos = torch.clamp(dot(mean, unit), -1.0, 1.0)
            theta = torch.arccos(cos)
            if theta.item() < tol:
                continue
            tangent += a * (theta / torch.sin(theta)) * (unit - cos * mean)
        length = norm(tangent)
        if length.item() < tol:
            break
        mean = torch.cos(length) * mean + torch.sin(length) * (tangent / length)
        unit_norm = norm(mean)
        if unit_norm.item() > tol:
            mean = mean / unit_norm
    return sum(alpha * length for alpha, length in zip(alphas, norms)) * mean


# -- methods ---------------------------------------------------------------------------------------
ORIGIN = Param("origin", str, "base", "base: the points are the task vectors and the result is added to the base "
               "(mergekit with a base_model); zero: the points are the weights themselves, the base being the first "
               "of them with weight base_weight (mergekit without one)", choices=("base", "zero"))
BASE_WEIGHT = Param("base_weight", float, 1.0, "origin: zero only: the base's own weight as a point", low=-100,
                    high=100, schedulable=True)
FLATTEN = Param("nuslerp_flatten", bool, True, "nuslerp: one angle for the whole tensor; false: one per row "
                "(or per column, nuslerp_row_wise)")
ROW_WISE = Param("nuslerp_row_wise", bool, False, "nuslerp with nuslerp_flatten: false: interpolate the columns "
                 "(vectors along dim 0, out x in) instead of the rows; mergekit's name, its behaviour")
NORMALIZE_WEIGHTS = Param("normalize_weights", bool, True, "multislerp: divide the weights by their sum")
EPS = Param("eps", float, 1e-8, "multislerp: added to the norms it divides by", low=0.0, high=1.0, schedulable=True)
MAX_ITER = Param("max_iter", int, 10, "karcher: gradient steps on the sphere", low=0, high=10000)
TOL = Param("tol", float, 1e-5, "karcher: steps stop once shorter than tol; points with norm <= tol do not steer",
            low=0.0, high=1.0, schedulable=True)


def points_of(trimmed: Sequence[torch.Tensor], weights: torch.Tensor, params: Mapping[str, Any],
              base: torch.Tensor) -> tuple[list[torch.Tensor], list[float]]:
    """The points and their weights: the task vectors (origin: base), or the base and the
    fine-tunes' weights rebuilt as base + tau (origin: zero)."""
    if params["origin"] == "base":
        return list(trimmed), weights.tolist()
    return [base, *(base + tau for tau in trimmed)], [params["base_weight"], *weights.tolist()]


def _relative(merged: torch.Tensor, params: Mapping[str, Any], base: torch.Tensor) -> torch.Tensor:
    """The merged change from the base (origin: base already is one)."""
    return merged if params["origin"] == "base" else merged - base


def _point_weights(params: Mapping[str, Any], weights: Sequence[float]) -> tuple[list[float], str]:
    """The points' weights (the base's first with origin: zero) and how the error names them."""
    if params["origin"] == "zero":
        return [params["base_weight"], *weights], " (base_weight first)"
    return list(weights), ""


def _two_points(params, weights) -> None:
    """Two points, and a position t = w1 / (w0 + w1) that interpolates: with weights of both signs t
    leaves [0, 1], and as w0 + w1 -> 0 the extrapolation grows without bound (mergekit switches to
    t = 0.5 only below 1e-6), so `means_stay_bounded` applies to the two weights."""
    want = 2 if params["origin"] == "base" else 1
    if len(weights) != want:
        raise ValueError(f"models: nuslerp interpolates between two points: {want} model(s) with origin: "
                         f"{params['origin']}, got {len(weights)}")
    points, named = _point_weights(params, weights)
    means_stay_bounded(points, subsets=False, extra=named,
                       remedy="weights of one sign (then t = w1 / (w0 + w1) stays in [0, 1])")


def _multislerp_weights(params, weights) -> None:
    """With normalize_weights the weights are divided by their sum, which scales the result (the
    weighted mean of the points' norms): a sum near 0 amplifies it (`means_stay_bounded`). One task
    vector is returned as it is, whatever its weight."""
    if params["origin"] == "base" and len(weights) == 1:
        return
    points, named = _point_weights(params, weights)
    if params["normalize_weights"]:
        if sum(points) == 0:
            raise ValueError("weight: the points' weights sum to 0; multislerp divides by their sum")
        means_stay_bounded(points, subsets=False, extra=named, remedy="normalize_weights: false")


def _karcher_weights(params, weights) -> None:
    """The weights are divided by their sum, and the result is scaled by the weighted mean of the
    points' norms: a sum near 0 amplifies it (`means_stay_bounded`)."""
    points, named = _point_weights(params, weights)
    if sum(points) == 0:
        raise ValueError("weight: the points' weights sum to 0; karcher divides by their sum")
    means_stay_bounded(points, subsets=False, extra=named, remedy="weights of one sign (mergekit: all equal)")


@register_method("nuslerp", params=(ORIGIN, BASE_WEIGHT, FLATTEN, ROW_WISE), needs_base=True, elementwise=False,
                 check=_two_points, absent="zero")
def nuslerp_method(trimmed, weights, *, params, base, **_):
    """SLERP between two points at t = w1 / (w0 + w1): two task vectors, or the base and one model
    (mergekit's nuslerp)."""
    (p0, p1), (w0, w1) = points_of(trimmed, weights, params, base)
    merged = nuslerp(nuslerp_t(w0, w1), p0, p1, params["nuslerp_flatten"], params["nuslerp_row_wise"])
    return _relative(merged, params, base)


@register_method("multislerp", params=(ORIGIN, BASE_WEIGHT, NORMALIZE_WEIGHTS, EPS), needs_base=True,
                 elementwise=False, check=_multislerp_weights, absent="zero")
def multislerp_method(trimmed, weights, *, params, base, **_):
    """Weighted spherical barycentre of the points, through the tangent space at their mean direction
    (mergekit's multislerp)."""
    points, w = points_of(trimmed, weights, params, base)
    if params["origin"] == "base" and len(points) == 1:  # mergekit returns the one model as it is
        return trimmed[0].clone()
    return _relative(multislerp(points, w, params["normalize_weights"], params["eps"]), params, base)


@register_method("karcher", params=(ORIGIN.with_default("zero"), BASE_WEIGHT, MAX_ITER, TOL), needs_base=True,
                 elementwise=False, check=_karcher_weights, absent="zero")
def karcher_method(trimmed, weights, *, params, base, **_):
    """Karcher (Riemannian) mean of the points on the sphere, rescaled by their mean norm (mergekit's
    karcher: the base and every model, equal weights)."""
    points, w = points_of(trimmed, weights, params, base)
    total = sum(w)
    kept = [(p, x / total) for p, x in zip(points, w) if x != 0]  # a point of weight 0 takes no part
    merged = karcher([p for p, _ in kept], [a for _, a in kept], params["max_iter"], params["tol"])
    return _relative(merged, params, base)
