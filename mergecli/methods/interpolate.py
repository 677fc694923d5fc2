"""Merges of whole weights rather than of task vectors: SLERP between two models, and the
weighted average of models (a "model soup", mergekit's `linear`).

Both need the base tensor itself, not only the task vectors: SLERP's angle is between the two
weight tensors, and an unnormalised average scales the base. Pure functions on tensors; math in
fp32 (fp64 when the inputs are fp64).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

DOT_THRESHOLD = 0.9995
"""Above this |cos| the two tensors are treated as parallel and interpolated linearly (mergekit)."""


def _work_dtype(tensor: torch.Tensor) -> torch.dtype:
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, dot_threshold: float = DOT_THRESHOLD,
          eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation from `a` (t = 0) to `b` (t = 1), over the whole tensor as one vector.

    With cos(theta) = <a, b> / (|a| |b|) (clamped to [-1, 1]):

        slerp = sin((1 - t) theta) / sin(theta) * a + sin(t theta) / sin(theta) * b

    applied to the unnormalised tensors, so the result's norm lies between |a| and |b| (it is
    exactly the arc between them only when |a| = |b|). Where |cos| > `dot_threshold`, nearly
    parallel or antiparallel, sin(theta) ~ 0 and the formula is ill-conditioned: plain linear
    interpolation (1 - t) a + t b is used instead. A norm at or below `eps` counts as 1 in the cosine
    (a zero tensor gives cos = 0). These are mergekit 0.1.5's rules (`merge_methods/slerp.py`), so
    the same config gives the same tensor; `t` outside [0, 1] extrapolates, as there.
    """
    dtype = _work_dtype(a)
    x = a.reshape(-1).to(dtype)
    y = b.reshape(-1).to(dtype)
    norm_x = float(torch.linalg.vector_norm(x))
    norm_y = float(torch.linalg.vector_norm(y))
    norm_x = norm_x if norm_x > eps else 1.0
    norm_y = norm_y if norm_y > eps else 1.0
    dot = min(1.0, max(-1.0, float(torch.dot(x / norm_x, y / norm_y))))
    if abs(dot) > dot_threshold:
        coef_a, coef_b = 1.0 - t, t
    else:
        theta = math.acos(dot)
        coef_a = math.sin((1.0 - t) * theta) / math.sin(theta)
        coef_b = math.sin(t * theta) / math.sin(theta)
    return (coef_a * x + coef_b * y).reshape(a.shape)


def soup(base: torch.Tensor, taus: Sequence[torch.Tensor], weights: Sequence[float], base_weight: float = 0.0,
         normalize: bool = True) -> torch.Tensor:
    """Weighted average of the base and the models, written on task vectors (mergekit's `linear`).

    The models are theta_i = base + tau_i and the base itself takes part with `base_weight`, so

        sum_i w_i theta_i / W = base + sum_i w_i tau_i / W,       W = base_weight + sum_i w_i

    With `normalize=False` the weights are used as given: sum_i w_i theta_i = W * base + sum_i w_i
    tau_i, which rescales the base whenever W != 1 (mergekit allows it). W = 0 with normalize is an
    error (mergekit would divide by zero).
    """
    total = base_weight + float(sum(weights))
    out = base.to(_work_dtype(base), copy=True)
    if normalize:
        if total == 0:
            raise ValueError("weights sum to 0: a weighted average is undefined")
        scale = 1.0 / total
    else:
        out.mul_(total)
        scale = 1.0
    for tau, w in zip(taus, weights):
        out.add_(tau.to(out.dtype), alpha=w * scale)
    return out
