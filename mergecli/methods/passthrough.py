"""mergekit 0.1.5's passthrough: one input's tensors as they are, each optionally multiplied by a
`scale` (a per-tensor setting, e.g. 0.5 for the down projections). mergekit uses it to stack layer
ranges of several models; over whole models it is a copy of one model, rescaled where `scale` says.

Here that model is the recipe's one fine-tune, rebuilt as base + tau (the base is only the
reference its task vector was taken against).
"""

from __future__ import annotations

import torch

from .table import Param, register_method


def passthrough(theta: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """theta, times `scale` where one is given (mergekit's `scale`, default none: unchanged)."""
    return theta if scale is None else theta * scale


SCALE = Param("scale", float, 1.0, "passthrough: factor on the model's weights", low=-100, high=100, schedulable=True)


def _one_model(params, weights) -> None:
    if len(weights) != 1:
        raise ValueError(f"models: passthrough copies exactly one model, got {len(weights)}")


@register_method("passthrough", params=(SCALE,), needs_base=True, check=_one_model, absent="zero")
def passthrough_method(trimmed, weights, *, params, base, **_):
    """The one model's weights as they are, times scale (mergekit's passthrough over whole models)."""
    return passthrough(base + trimmed[0], params["scale"]).sub_(base)
