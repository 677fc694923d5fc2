"""Merge methods registered by name: one combine function plus how task vectors are trimmed.

Adding a method is one decorated function. `merge_tensor` is the per-tensor pipeline every method
shares: score -> select -> (rescale) -> combine; it is pure (tensors in, tensor out).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .combine import disjoint_mean, weighted_sum
from .scores import SCORES
from .sparsify import bernoulli_mask, tensor_generator, topk_mask

CombineFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Method:
    name: str
    combine: CombineFn
    sparsify: bool
    rescale: bool
    default_score: str | None
    doc: str


METHODS: dict[str, Method] = {}


def register_method(name: str, *, sparsify: bool, rescale: bool = False,
                    default_score: str | None = None) -> Callable[[CombineFn], CombineFn]:
    def decorate(fn: CombineFn) -> CombineFn:
        METHODS[name] = Method(name, fn, sparsify, rescale, default_score, (fn.__doc__ or "").strip())
        return fn
    return decorate


@register_method("task_arithmetic", sparsify=False)
def task_arithmetic(trimmed: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """theta_base + lambda * sum_i w_i tau_i (whole task vectors)."""
    return weighted_sum(trimmed, weights)


@register_method("ties", sparsify=True, default_score="magnitude")
def ties(trimmed: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Trim to density, elect signs, disjoint weighted mean (Yadav et al. 2023)."""
    return disjoint_mean(trimmed, weights)


@register_method("dare_linear", sparsify=True, rescale=True, default_score="random")
def dare_linear(trimmed: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Drop, rescale survivors by 1/density, weighted sum (Yu et al. 2023)."""
    return weighted_sum(trimmed, weights)


@register_method("dare_ties", sparsify=True, rescale=True, default_score="random")
def dare_ties(trimmed: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Drop and rescale as DARE, then TIES' sign election and disjoint mean."""
    return disjoint_mean(trimmed, weights)


@dataclass(frozen=True)
class TrimParams:
    score: str | None
    density: float
    per_row: bool = False
    seed: int = 0


def trim(tau: torch.Tensor, params: TrimParams, rescale: bool, tensor_name: str, model_index: int,
         transposed: bool = False) -> torch.Tensor:
    """Keep the selected entries of one task vector (and rescale them for DARE).

    `transposed` marks weights stored in x out (GPT-2 Conv1D) so per-row selection works on output
    rows whatever the storage layout.
    """
    if params.density >= 1.0 or params.score is None:
        return tau
    score = SCORES[params.score]
    if score.selection == "bernoulli":
        mask = bernoulli_mask(tau.shape, params.density, tensor_generator(params.seed, tensor_name, model_index))
    else:
        scores = score.fn(tau.T if transposed else tau)
        mask = topk_mask(scores, params.density, per_row=params.per_row)
        mask = mask.T if transposed else mask
    kept = tau * mask
    return kept / params.density if rescale else kept


def merge_tensor(method: Method, taus: list[torch.Tensor | None], weights: list[float], params: TrimParams,
                 tensor_name: str, transposed: bool = False) -> tuple[torch.Tensor, int, int]:
    """Merged delta for one tensor, plus (entries kept, entries offered) for the density report.

    A model without this tensor (e.g. a LoRA that did not target it) contributes nothing: it is
    left out of the stack, so it neither votes in TIES nor counts in the mean.
    """
    present = [(i, t) for i, t in enumerate(taus) if t is not None]
    if not present:
        raise ValueError(f"{tensor_name}: no task vector has this tensor")
    trimmed = [trim(t.float(), params, method.rescale, tensor_name, i, transposed) if method.sparsify else t.float()
               for i, t in present]
    stacked = torch.stack(trimmed)
    kept = int(torch.count_nonzero(stacked))
    w = torch.tensor([weights[i] for i, _ in present], dtype=torch.float32)
    return method.combine(stacked, w), kept, stacked.numel()
