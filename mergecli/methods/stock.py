"""Model Stock (Jang et al. 2024, arXiv:2403.19522): how far to move from the base towards the
average of the fine-tunes, from the angle between their task vectors.

The paper's ratio for N fine-tunes whose task vectors meet at angle theta:

    t = N cos(theta) / (1 + (N - 1) cos(theta)),     merged = t * mean_i(theta_i) + (1 - t) * base
                                                             = base + t * mean_i(tau_i)

so the method needs only the task vectors (the base cancels), but whole tensors: cos(theta) is
the mean over all pairs i < j of cos(tau_i, tau_j), over the tensor (or per row, `filter_wise`).
Details as mergekit 0.1.5 (`merge_methods/model_stock.py`): each pair's cosine divides by
max(|tau_i| |tau_j|, 1e-6) and is clamped to [-1, 1]; where |1 + (N - 1) cos| < 1e-6 the ratio has
no finite value and the base is kept (t = 0); where |t| would exceed `MAX_AMPLIFICATION` (cos near
-1 / (N - 1)) mergecli stops naming the tensor (mergekit writes it). The weights of the models play no part. A model
without a tensor has tau = 0 there (mergekit sees a LoRA's untouched weights as the base's).
"""

from __future__ import annotations

from typing import Sequence

import torch

from .table import MAX_AMPLIFICATION, Param, Unbounded, register_method


def stock_ratio(taus: Sequence[torch.Tensor], filter_wise: bool = False) -> torch.Tensor:
    """t for one tensor: a 0-d tensor, or one value per row (dim 0) with `filter_wise`, shaped
    (rows, 1, ..., 1) so it broadcasts against the tensor. Needs at least two task vectors."""
    if len(taus) < 2:
        raise ValueError(f"model stock needs at least 2 fine-tunes, got {len(taus)}")
    shape = taus[0].shape
    rows = shape[0] if filter_wise and len(shape) >= 2 else 1
    flat = [tau.float().reshape(rows, -1) for tau in taus]
    cosines = []
    for i, x in enumerate(flat):
        for y in flat[i + 1:]:
            norms = torch.linalg.vector_norm(x, dim=1) * torch.linalg.vector_norm(y, dim=1)
            cosines.append(((x * y).sum(dim=1) / norms.clamp(min=1e-6)).clamp(-1.0, 1.0))
    cos = torch.stack(cosines).mean(dim=0)
    n = len(taus)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, torch.ones_like(cos), denominator))
    worst = int(t.abs().argmax())
    if float(t[worst].abs()) > MAX_AMPLIFICATION:
        ratio = float(t[worst])
        raise Unbounded(f"model stock's ratio N cos / (1 + (N - 1) cos) is {ratio:.4g} (cos {float(cos[worst]):.4g}, "
                        f"N {n}): the merged change would be {abs(ratio):.4g} times the models' mean task vector")
    if filter_wise and len(shape) >= 2:
        return t.reshape(rows, *([1] * (len(shape) - 1)))
    return t.reshape(())


def model_stock(taus: Sequence[torch.Tensor], filter_wise: bool = False) -> torch.Tensor:
    """The merged delta t * mean_i(tau_i) (add it to the base)."""
    t = stock_ratio(taus, filter_wise)
    total = torch.zeros(taus[0].shape, dtype=torch.float32, device=taus[0].device)
    for tau in taus:
        total.add_(tau)
    return total.mul_(t / len(taus))


FILTER_WISE = Param("filter_wise", bool, False, "model_stock: one ratio per output row instead of per tensor")


def two_models(params, weights) -> None:
    if len(weights) < 2:
        raise ValueError(f"models: model_stock needs at least 2 models, got {len(weights)}")


@register_method("model_stock", params=(FILTER_WISE,), elementwise=False, check=two_models, absent="zero")
def model_stock_method(trimmed, weights, *, params, **_):
    """Move from the base towards the models' average by the ratio their angle gives (Jang et al. 2024)."""
    return model_stock(trimmed, params["filter_wise"])
