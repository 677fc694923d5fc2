"""Merges that choose, entry by entry, which model's change to take, as mergekit 0.1.5 computes
them: SCE (select by variance, weight by energy, erase by sign), NearSwap (take the other model
where it is already close), Arcee Fusion (take the changes of outlying importance) and RAM
(average only the models that changed an entry; RAM+ boosts a model's unique changes).

Pure functions on task vectors tau_i = theta_i - base (oriented out x in); each transcribes
mergekit's (`merge_methods/sce.py`, `nearswap.py`, `arcee_fusion.py`, `ram.py`) operation for
operation in fp32, so the results agree to fp32 rounding. Two deliberate differences, both only
where mergekit's own answer is arbitrary: SCE's top-k keeps the first of tied variances in flat
order (mergekit: whatever torch.topk returns), and Arcee Fusion takes its quartiles over the whole
tensor (mergekit samples 1,000,000 entries with the global RNG above that size, so its threshold
is random there). None of these methods draws random numbers or uses the models' weights, and
their sums over a whole tensor go through `reduce`, so no result depends on the thread count.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .reduce import last_sum, row_sums
from .sparsify import kth_largest, topk_threshold
from .table import Param, register_method


# -- SCE (FuseChat, Wan et al. 2024, arXiv:2408.07990) ---------------------------------------------
def sce_mask(taus: torch.Tensor, select_topk: float) -> torch.Tensor:
    """The entries whose variance across the models (population variance, dim 0 of the stacked
    task vectors) is among the k = int(select_topk * #nonzero variances) highest: a 0/1 float
    mask of one model's shape; all ones at select_topk >= 1, all zeros at <= 0 or k = 0."""
    if select_topk <= 0:
        return torch.zeros_like(taus[0])
    if select_topk >= 1:
        return torch.ones_like(taus[0])
    var = torch.var(taus, dim=0, unbiased=False)
    k = int(int(torch.count_nonzero(var)) * select_topk)
    if k == 0:
        return torch.zeros_like(var)
    flat = var.abs().reshape(-1)
    return topk_threshold(flat, k).mask(flat).reshape(var.shape).to(var.dtype)


def sce_weights(taus: torch.Tensor) -> torch.Tensor:
    """Each model's matrix-level coefficient: mean(tau_i^2) / sum_j mean(tau_j^2), or 1/N each
    where that sum is below 1e-6 in magnitude (mergekit's guard: small task vectors, e.g. a
    fine-tune's ~1e-3 updates, fall back to equal weights)."""
    squares = taus.square().reshape(taus.shape[0], -1)
    energy = row_sums(squares) / squares.shape[1]
    total = torch.sum(energy).item()
    if abs(total) < 1e-6:
        return torch.ones_like(energy) / energy.shape[0]
    return energy / total


def sce(taus: Sequence[torch.Tensor], select_topk: float = 1.0) -> torch.Tensor:
    """Select: zero the entries outside `sce_mask` in every task vector. Calculate: the models'
    coefficients c_i (`sce_weights`, of the selected vectors). Erase: keep model i's entry only
    where its sign is the majority sign, sign(sum_i tau_i) with + where the sum is 0 (a zero entry
    never agrees). The merged change is sum_i c_i e_i tau_i / max(sum_i c_i e_i, 1e-6)."""
    stacked = torch.stack([t.float() for t in taus], dim=0)
    if select_topk < 1:
        stacked = stacked * sce_mask(stacked, select_topk).unsqueeze(0)
    majority = (stacked.sum(dim=0) >= 0).to(stacked.dtype) * 2 - 1
    agree = stacked.sign() == majority
    coefficients = sce_weights(stacked).view(-1, *([1] * (stacked.dim() - 1)))
    erased = coefficients * agree
    return (stacked * erased).sum(dim=0) / torch.sum(erased, dim=0).clamp(min=1e-6)


# -- NearSwap (alchemonaut, QuartetAnemoi-70B) -----------------------------------------------------
def nearswap(base: torch.Tensor, tau: torch.Tensor, t: float) -> torch.Tensor:
    """The merged weights w theta + (1 - w) base with theta = base + tau and, entry by entry,
    w = clamp(t / max(|tau|, 1e-6), 0, 1): the model's value where it is within t of the base,
    moving towards the base as they differ more (w = t / |tau|)."""
    weight = (t / tau.abs().clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * (base + tau) + (1 - weight) * base


# -- Arcee Fusion (mergekit 0.1) ---------------------------------------------------------------------
def fusion_importance(base: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """|tau| times KL(softmax(theta) || softmax(base)) of its row (softmax over the last dim, each
    probability + 1e-8), theta = base + tau."""
    p = F.softmax(base + tau, dim=-1) + 1e-8
    q = F.softmax(base, dim=-1) + 1e-8
    return tau.abs() * last_sum(p * torch.log(p / q))


def fusion_threshold(importance: torch.Tensor) -> torch.Tensor:
    """median + 1.5 (q3 - q1), each quartile the sorted value at index floor(q (n - 1)) (q
    computed in fp32, as mergekit); over every entry (mergekit samples 10^6 above that size)."""
    flat = importance.reshape(-1)
    n = flat.numel()
    indices = (torch.tensor([0.25, 0.5, 0.75]) * (n - 1)).long().tolist()
    q1, median, q3 = (kth_largest(flat, n - i)[0] for i in indices)
    return median + 1.5 * (q3 - q1)


def arcee_fusion(base: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """The model's change where its importance reaches the threshold, nothing elsewhere:
    tau * [importance >= median + 1.5 IQR]."""
    importance = fusion_importance(base, tau)
    return tau * (importance >= fusion_threshold(importance)).float()


# -- RAM (Reinforced Agent Merging, arXiv:2601.13572) -----------------------------------------------
def _contributions(taus: Sequence[torch.Tensor], epsilon: float):
    stacked = torch.stack([t.float() for t in taus], dim=0)
    flat = stacked.view(stacked.shape[0], -1)
    changed = flat.abs() > epsilon
    counts = changed.sum(dim=0, keepdim=True)
    return stacked, flat * changed, changed, counts, counts > 1, counts == 1


def ram(taus: Sequence[torch.Tensor], epsilon: float = 1e-5) -> torch.Tensor:
    """The mean over the models that changed an entry (|tau_i| > epsilon) of their changes: a
    change only one model made is taken whole, shared ones are averaged, 0 where none changed it."""
    stacked, kept, _, counts, shared, unique = _contributions(taus, epsilon)
    merged = (kept * unique + kept * shared / counts.clamp(min=1)).sum(dim=0, keepdim=True)
    return merged.reshape(stacked.shape[1:])


def ramplus_tl(taus: Sequence[torch.Tensor], r: float = 0.1, alpha: float = 0.2,
               epsilon: float = 1e-5) -> torch.Tensor:
    """RAM with each model's unique changes scaled by lambda_i = 1 + r * clamp(rho_i, 0, alpha),
    rho_i = (entries model i shares with another) / max(entries only model i changed, epsilon),
    counted over the tensor (tensor-local RAM+)."""
    stacked, kept, changed, counts, shared, unique = _contributions(taus, epsilon)
    rho = (changed & shared).sum(dim=1) / (changed & unique).sum(dim=1).clamp(min=epsilon)
    boost = 1 + r * rho.clamp(min=0, max=alpha)
    merged = (kept * unique * boost.unsqueeze(-1) + kept * shared / counts.clamp(min=1)).sum(dim=0, keepdim=True)
    return merged.reshape(stacked.shape[1:])


# -- methods ---------------------------------------------------------------------------------------
SELECT_TOPK = Param("select_topk", float, 1.0, "sce: fraction of the entries (of those whose variance across the "
                    "models is not 0) kept, by highest variance; 1 keeps all", low=0.0, high=1.0, schedulable=True)
NEAR_T = Param("t", float, 1e-4, "nearswap: take the model's value where it is within t of the base, "
               "weight t / |theta - base| beyond", low=0.0, schedulable=True)
RAM_EPSILON = Param("epsilon", float, 1e-5, "ram: a model changed an entry where |tau| > epsilon", low=0.0,
                    schedulable=True)
RAM_R = Param("r", float, 0.1, "ramplus_tl: strength of the boost of a model's unique changes", low=-100, high=100,
              schedulable=True)
RAM_ALPHA = Param("alpha", float, 0.2, "ramplus_tl: cap on rho (shared / unique changes) in the boost", low=0.0,
                  high=100, schedulable=True)


def _one_model(name: str):
    def rule(params, weights) -> None:
        if len(weights) != 1:
            raise ValueError(f"models: {name} merges the base with exactly one model, got {len(weights)}")
    return rule


@register_method("sce", params=(SELECT_TOPK,), elementwise=False, absent="zero")
def sce_method(trimmed, weights, *, params, **_):
    """Select entries by variance, weight each model by its energy, erase sign conflicts (mergekit's
    sce; the weights play no part)."""
    return sce(trimmed, params["select_topk"])


@register_method("nearswap", params=(NEAR_T,), needs_base=True, check=_one_model("nearswap"), absent="zero")
def nearswap_method(trimmed, weights, *, params, base, **_):
    """The model's value where it is within t of the base's, pulled towards the base beyond (mergekit's nearswap)."""
    return nearswap(base, trimmed[0], params["t"]).sub_(base)


@register_method("arcee_fusion", params=(), needs_base=True, elementwise=False, check=_one_model("arcee_fusion"),
                 absent="zero")
def arcee_fusion_method(trimmed, weights, *, params, base, **_):
    """The model's changes whose importance (|tau| x KL of the row's softmax) is an outlier,
    above median + 1.5 IQR (mergekit's arcee_fusion)."""
    return arcee_fusion(base, trimmed[0])


@register_method("ram", params=(RAM_EPSILON,), absent="zero")
def ram_method(trimmed, weights, *, params, **_):
    """Average each entry over the models that changed it, |tau| > epsilon (mergekit's ram; the
    weights play no part)."""
    return ram(trimmed, params["epsilon"])


@register_method("ramplus_tl", params=(RAM_R, RAM_ALPHA, RAM_EPSILON), elementwise=False, absent="zero")
def ramplus_tl_method(trimmed, weights, *, params, **_):
    """RAM, each model's unique changes boosted by how much it also shares, per tensor (mergekit's ramplus_tl)."""
    return ramplus_tl(trimmed, params["r"], params["alpha"], params["epsilon"])
