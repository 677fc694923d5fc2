"""Merges of whole weights rather than of task vectors: SLERP between two models, and the
weighted average of models (`linear`, with mergekit's meaning: a "model soup").

Both need the base tensor itself, not only the task vectors: SLERP's angle is between the two
weight tensors, and an unnormalised average scales the base. Pure functions on tensors; math in
fp32 (fp64 when the inputs are fp64). Both methods are registered at the end; a model without a
tensor counts as the base there (tau = 0, with its weight), as mergekit sees a LoRA's untouched
weights.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .table import NORMALIZE, Param, means_stay_bounded, register_method

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


def weighted_average(base: torch.Tensor, taus: Sequence[torch.Tensor], weights: Sequence[float],
                     base_weight: float = 0.0, normalize: bool = True) -> torch.Tensor:
    """The change from the base of the weighted average of the base and the models (mergekit's
    `linear`), written on task vectors.

    The models are theta_i = base + tau_i and the base itself takes part with `base_weight`, so

        sum_i w_i theta_i / W = base + sum_i w_i tau_i / W,       W = base_weight + sum_i w_i

    and the change is sum_i w_i tau_i / W, without the base. With `normalize=False` the weights are
    used as given: sum_i w_i theta_i = W * base + sum_i w_i tau_i, a change of (W - 1) * base +
    sum_i w_i tau_i, which rescales the base whenever W != 1 (mergekit allows it). W = 0 with
    normalize is an error (mergekit would divide by zero).
    """
    total = base_weight + float(sum(weights))
    out = torch.zeros(base.shape, dtype=_work_dtype(base), device=base.device)
    if normalize:
        if total == 0:
            raise ValueError("weights sum to 0: a weighted average is undefined")
        scale = 1.0 / total
    else:
        out.add_(base, alpha=total - 1.0)
        scale = 1.0
    for tau, w in zip(taus, weights):
        out.add_(tau.to(out.dtype), alpha=w * scale)
    return out


# -- methods ---------------------------------------------------------------------------------------
T = Param("t", float, 0.5, "slerp: position on the arc from the base (0) to the model (1)", low=0.0, high=1.0,
          schedulable=True)
BASE_WEIGHT = Param("base_weight", float, 0.0, "linear: the base model's own weight in the average", low=-100,
                    high=100, schedulable=True)


def one_model(params, weights) -> None:
    if len(weights) != 1:
        raise ValueError(f"models: slerp interpolates between the base and exactly one model, got {len(weights)}")


def average_defined(params, weights) -> None:
    total = params["base_weight"] + sum(weights)
    if params["normalize"] and total == 0:
        raise ValueError("weight: the weights (base_weight included) sum to 0; a weighted average is undefined")
    if params["normalize"]:  # the base's weight divides too: its change is 0, its weight counts
        means_stay_bounded([params["base_weight"], *weights] if params["base_weight"] else weights, subsets=False,
                           extra=" (base_weight first)" if params["base_weight"] else "")


@register_method("slerp", params=(T,), needs_base=True, elementwise=False, check=one_model, absent="zero")
def slerp_method(trimmed, weights, *, params, base, **_):
    """Spherical interpolation between the base (t = 0) and one model (t = 1), per tensor (mergekit's slerp)."""
    return slerp(base, base + trimmed[0], params["t"]).sub_(base)


@register_method("linear", params=(NORMALIZE.with_default(True), BASE_WEIGHT), needs_base=True,
                 check=average_defined, absent="zero")
def linear_method(trimmed, weights, *, params, base, **_):
    """Weighted average of the models' weights, the base's own weight included (mergekit's linear;
    was called `soup`)."""
    return weighted_average(base, trimmed, weights.tolist(), params["base_weight"], params["normalize"])
