"""Merge methods registered by name, and the per-tensor pipeline they share.

A method is one combine function registered with how its task vectors are trimmed; adding one is
one decorated function. `merge_tensor` is pure (tensors in, tensor out): orient out x in ->
score -> select -> (rescale) -> combine -> orient back, a chunk of rows at a time.

Chunks: every step but two is elementwise, so a large tensor is processed in chunks of about
`CHUNK_ELEMENTS` entries whose temporaries stay in the CPU cache, instead of a dozen passes over
tensor-sized temporaries in main memory (each new large temporary also costs page faults). The
two whole-tensor steps are done up front (the per-tensor top-k threshold) or force one chunk (OBS
compensation, rank-probability DARE, RegMean). Chunking never changes a result: thresholds are
exact with the same tie rule, and random draws are addressed by entry index.

Selection: TIES-style methods keep the exact top-k of a ranking score; DARE-style methods
(`rescale=True`) are stochastic and unbiased: Bernoulli(d) with the `random` score, or
rank-dependent keep-probabilities with a ranking score (see `rank_probabilities`), survivors
divided by their keep-probability.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Protocol, Sequence

import torch

from .combine import disjoint_mean, weighted_sum
from .hessian_math import DegenerateStatistics, obs_trim, regmean_delta
from .scores import SCORES
from .sparsify import TopK, bernoulli_mask, keep_count, random_stream, rank_probabilities, topk_mask, topk_threshold
from .stats import LayerStats


class CombineFn(Protocol):
    def __call__(self, trimmed: Sequence[torch.Tensor], weights: torch.Tensor, stats: list[LayerStats | None],
                 params: "TrimParams") -> torch.Tensor: ...


@dataclass(frozen=True)
class Method:
    name: str
    combine: CombineFn
    sparsify: bool
    rescale: bool
    default_score: str | None
    default_density: float
    needs_stats: bool
    elementwise: bool
    doc: str


METHODS: dict[str, Method] = {}


def register_method(name: str, *, sparsify: bool, rescale: bool = False, default_score: str | None = None,
                    default_density: float = 0.2, needs_stats: bool = False,
                    elementwise: bool = True) -> Callable[[CombineFn], CombineFn]:
    """`elementwise`: each merged entry depends only on the same entry of the inputs (chunkable)."""
    def decorate(fn: CombineFn) -> CombineFn:
        METHODS[name] = Method(name, fn, sparsify, rescale, default_score, default_density, needs_stats,
                               elementwise, (fn.__doc__ or "").strip())
        return fn
    return decorate


@register_method("task_arithmetic", sparsify=False)
def task_arithmetic(trimmed, weights, stats, params):
    """theta_base + lambda * sum_i w_i tau_i (whole task vectors)."""
    return weighted_sum(trimmed, weights)


@register_method("linear", sparsify=True, default_score="magnitude")
def linear(trimmed, weights, stats, params):
    """Trimmed task arithmetic: keep the top-k by score, then sum_i w_i t_i (no rescale)."""
    return weighted_sum(trimmed, weights)


@register_method("ties", sparsify=True, default_score="magnitude")
def ties(trimmed, weights, stats, params):
    """Trim to density, elect signs, disjoint weighted mean (Yadav et al. 2023)."""
    return disjoint_mean(trimmed, weights)


@register_method("dare_linear", sparsify=True, rescale=True, default_score="random")
def dare_linear(trimmed, weights, stats, params):
    """Drop, rescale survivors by 1/keep-probability, weighted sum (Yu et al. 2023)."""
    return weighted_sum(trimmed, weights)


@register_method("dare_ties", sparsify=True, rescale=True, default_score="random")
def dare_ties(trimmed, weights, stats, params):
    """Drop and rescale as DARE, then TIES' sign election and disjoint mean."""
    return disjoint_mean(trimmed, weights)


@register_method("regmean", sparsify=True, default_score="magnitude", default_density=1.0, needs_stats=True,
                 elementwise=False)
def regmean(trimmed, weights, stats, params):
    """Linear layers: (sum w_i W_i G~_i)(sum w_i G~_i)^-1 (Jin et al. 2023); other tensors: weighted mean."""
    if all(s is not None for s in stats):
        return regmean_delta(trimmed, [s.gram for s in stats], weights, params.alpha)
    return weighted_sum(trimmed, weights) / weights.sum()


CHUNK_ELEMENTS = 1 << 18


@dataclass(frozen=True)
class TrimParams:
    score: str | None
    density: float
    per_row: bool = False
    seed: int = 0
    compensate: bool = False
    alpha: float = 0.9


@dataclass(frozen=True)
class TaskTensor:
    """One model's task vector for one tensor, oriented out x in.

    `weights - reference` when a reference is given: a full fine-tune is kept as stored (bf16 is
    half the bytes of an fp32 difference) and the difference is taken one chunk of rows at a time.
    Without a reference, `weights` is the task vector itself (e.g. a LoRA product).
    """

    weights: torch.Tensor
    reference: torch.Tensor | None = None

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """A fresh, contiguous fp32 copy of rows [start, stop): callers may modify it in place."""
        tau = self.weights[start:stop].to(torch.float32, copy=True, memory_format=torch.contiguous_format)
        return tau if self.reference is None else tau.sub_(self.reference[start:stop])

    def to(self, device: torch.device) -> "TaskTensor":
        return TaskTensor(self.weights.to(device), None if self.reference is None else self.reference.to(device))

    def oriented(self, transposed: bool) -> "TaskTensor":
        return TaskTensor(orient(self.weights, transposed),
                          None if self.reference is None else orient(self.reference, transposed))


def orient(tensor: torch.Tensor, transposed: bool) -> torch.Tensor:
    """A view with rows = output features (a scalar becomes one row)."""
    if tensor.dim() == 0:
        return tensor.reshape(1)
    return tensor.T if transposed else tensor


class NonFiniteTaskVector(ValueError):
    """A task vector holds NaN or Inf; `index` is the model's position in the merge."""

    def __init__(self, tensor_name: str, index: int) -> None:
        super().__init__(f"{tensor_name}: task vector of model {index} has NaN/Inf entries")
        self.index = index


Trim = Callable[[torch.Tensor, int], tuple[torch.Tensor, int]]
"""(chunk of tau, index of its first entry) -> (trimmed chunk, entries kept)"""


def count(mask: torch.Tensor) -> int:
    """True entries of a boolean mask (a byte sum: faster than count_nonzero)."""
    return int(mask.view(torch.uint8).sum(dtype=torch.int64))


def plan_trim(tau: TaskTensor, params: TrimParams, rescale: bool, tensor_name: str, model_index: int,
              stats: LayerStats | None, chunks: list[tuple[int, int]],
              buffers: dict[torch.dtype, torch.Tensor] | None = None) -> Trim:
    """How one model's chunks of one tensor are trimmed; a per-tensor top-k finds its threshold here
    (in a score buffer taken from, or left in, `buffers`: the models of one tensor share it).

    The returned function may modify its chunk in place (chunks are fresh copies).
    """
    if params.score is None or (params.density >= 1.0 and not rescale):
        return lambda t, start: (t, t.numel())
    d = params.density
    score = SCORES[params.score]
    if stats is not None and (params.score == "sparsegpt" or params.compensate):
        try:
            stats.hinv_diag  # computed once per input group; raises if the statistics are unusable
        except DegenerateStatistics:
            stats = None
    if score.needs_stats and stats is None:
        score = SCORES["magnitude"]
    if params.compensate and stats is not None:
        def compensated(t: torch.Tensor, start: int) -> tuple[torch.Tensor, int]:
            kept = obs_trim(t, stats.gram, d, stats.damp)
            return kept, int(torch.count_nonzero(kept))
        return compensated
    stream = random_stream(params.seed, tensor_name, model_index)
    if score.selection == "bernoulli":
        def bernoulli(t: torch.Tensor, start: int) -> tuple[torch.Tensor, int]:
            keep = bernoulli_mask(t.shape, d, stream, start).to(t.device)
            return (t.div_(d) if rescale else t).mul_(keep), count(keep)
        return bernoulli
    if rescale:
        def ranked(t: torch.Tensor, start: int) -> tuple[torch.Tensor, int]:
            keep_p = rank_probabilities(score.fn(t, stats), d, params.per_row).to(t.device)
            keep = stream.uniform(t.shape, start).to(t.device) < keep_p
            return torch.where(keep, t / keep_p, torch.zeros_like(t)).to(t.dtype), count(keep)
        return ranked
    if params.per_row and tau.weights.dim() >= 2:
        def selection(scores: torch.Tensor) -> torch.Tensor:
            return topk_mask(scores, d, per_row=True)
    else:
        selection = _threshold(tau, lambda t: score.fn(t, stats), d, chunks, {} if buffers is None else buffers).mask

    def top(t: torch.Tensor, start: int) -> tuple[torch.Tensor, int]:
        keep = selection(score.fn(t, stats))
        return t.mul_(keep), count(keep)
    return top


def _threshold(tau: TaskTensor, score: Callable[[torch.Tensor], torch.Tensor], density: float,
               chunks: list[tuple[int, int]], buffers: dict[torch.dtype, torch.Tensor]) -> TopK:
    """Per-tensor top-k: scores of every chunk gathered into one flat buffer, threshold found once."""
    first = score(tau.rows(*chunks[0])).reshape(-1)
    if len(chunks) == 1:
        flat = first
    else:  # the buffer has the score's dtype (float64 for data-aware scores): phase 2 compares exactly
        numel = tau.weights.numel()
        cols = numel // max(tau.weights.shape[0], 1)
        flat = buffers.get(first.dtype)
        if flat is None:
            flat = buffers[first.dtype] = torch.empty(numel, dtype=first.dtype, device=first.device)
        flat[: first.numel()] = first
        for start, stop in chunks[1:]:
            flat[start * cols: stop * cols] = score(tau.rows(start, stop)).reshape(-1)
    return topk_threshold(flat, keep_count(flat.numel(), density))


def trim(tau: torch.Tensor, params: TrimParams, rescale: bool, tensor_name: str, model_index: int,
         stats: LayerStats | None = None) -> torch.Tensor:
    """Keep the selected entries of one whole task vector (oriented out x in)."""
    source = TaskTensor(tau).oriented(False)
    whole = [(0, source.weights.shape[0])]
    return plan_trim(source, params, rescale, tensor_name, model_index, stats, whole)(source.rows(*whole[0]), 0)[0]


def _chunks(rows: int, cols: int, whole: bool) -> list[tuple[int, int]]:
    """Row ranges of about CHUNK_ELEMENTS entries; an even row count keeps chunk starts at even
    entries (see RandomStream)."""
    step = rows if whole else max(2, (CHUNK_ELEMENTS // max(cols, 1)) & ~1)
    return [(start, min(start + step, rows)) for start in range(0, rows, step)] or [(0, 0)]


def merge_tensor(method: Method, taus: Iterable[TaskTensor | torch.Tensor | None], weights: list[float],
                 params: TrimParams, tensor_name: str, transposed: bool = False,
                 stats: list[LayerStats | None] | None = None, base: torch.Tensor | None = None,
                 lam: float = 1.0, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, int, int]:
    """Merged delta for one tensor (or, given `base`, the merged weight `base + lam * delta` in
    `dtype`), plus (entries kept, entries offered) for the density report.

    A model without this tensor (None, e.g. a LoRA that did not target it) contributes nothing: it
    neither votes in TIES nor counts in a mean. `transposed` marks weights stored in x out
    (GPT-2's Conv1D); all math sees them out x in. A task vector with NaN/Inf raises
    NonFiniteTaskVector naming the model.
    """
    present = [(i, t if isinstance(t, TaskTensor) else TaskTensor(t)) for i, t in enumerate(taus) if t is not None]
    if not present:
        raise ValueError(f"{tensor_name}: no task vector has this tensor")
    shape = present[0][1].weights.shape
    sources = [t.oriented(transposed) for _, t in present]
    used_stats = [stats[i] if stats else None for i, _ in present]
    rows = sources[0].weights.shape[0]
    cols = sources[0].weights.numel() // max(rows, 1)
    whole = not method.elementwise or (method.sparsify and params.score is not None and (
        (params.compensate and any(s is not None for s in used_stats))
        or (method.rescale and SCORES[params.score].selection == "rank")))
    chunks = _chunks(rows, cols, whole)
    no_trim = TrimParams(None, 1.0)
    buffers: dict[torch.dtype, torch.Tensor] = {}
    trims = [plan_trim(src, params if method.sparsify else no_trim, method.rescale, tensor_name, i, s, chunks,
                       buffers) for (i, _), src, s in zip(present, sources, used_stats)]
    del buffers  # thresholds are found; the score buffer is not needed while merging
    w = torch.tensor([weights[i] for i, _ in present], dtype=torch.float32)
    out = torch.empty(shape, dtype=dtype or torch.float32, device=sources[0].weights.device)
    target = orient(out, transposed)
    reference = None if base is None else orient(base, transposed)
    kept = 0
    for start, stop in chunks:
        trimmed = []
        for (i, _), src, trim_chunk in zip(present, sources, trims):
            t = src.rows(start, stop)
            if not math.isfinite(float(t.sum())):
                raise NonFiniteTaskVector(tensor_name, i)
            t, k = trim_chunk(t, start * cols)
            kept += k
            trimmed.append(t)
        delta = method.combine(trimmed, w, used_stats, params)
        if reference is not None:
            delta = reference[start:stop].float().add_(delta, alpha=lam)
        target[start:stop] = delta
    return out, kept, len(present) * out.numel()
