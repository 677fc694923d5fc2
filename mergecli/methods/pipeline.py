"""The per-tensor merge pipeline: orient out x in -> score -> select -> (rescale) -> combine ->
add to the base, a chunk of rows at a time. Pure: tensors in, tensor out.

Chunks: every step but a few is elementwise, so a large tensor is processed in chunks of about
`CHUNK_ELEMENTS` entries whose temporaries stay in the CPU cache, instead of a dozen passes over
tensor-sized temporaries in main memory. What needs more than a chunk is decided in one place,
`plan_trim`: a per-tensor top-k finds its threshold up front (scores gathered chunk by chunk),
while OBS compensation and rank-probability DARE ask for the whole tensor as one chunk, as do
methods that are not elementwise (RegMean, SLERP). Chunking never changes a result: thresholds
are exact with the same tie rule, and random draws are addressed by entry index.

Selection: top-k trims keep the exact top-k of a ranking score; DARE trims are stochastic and
unbiased: Bernoulli(d) with the `random` score, or rank-dependent keep-probabilities with a
ranking score (see `rank_probabilities`), survivors divided by their keep-probability.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from .hessian_math import DegenerateStatistics, obs_trim
from .scores import SCORES
from .masks import Band, breadcrumbs_band, della_probabilities, l1_factor, sample_mask
from .sparsify import TopK, bernoulli_mask, keep_count, random_stream, rank_probabilities, topk_mask, topk_threshold
from .stats import LayerStats, TokenCounts
from .table import Method, Trim

CHUNK_ELEMENTS = 1 << 18


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


class OutOfRange(ValueError):
    """A merged value is NaN/Inf, or beyond what the output dtype can hold."""

    def __init__(self, tensor_name: str, value: float, dtype: torch.dtype) -> None:
        super().__init__(f"{tensor_name}: merged value {value:g} does not fit {dtype}")
        self.tensor_name, self.value, self.dtype = tensor_name, value, dtype


class NonFiniteTaskVector(ValueError):
    """A task vector holds NaN or Inf; `index` is the model's position in the merge."""

    def __init__(self, tensor_name: str, index: int) -> None:
        super().__init__(f"{tensor_name}: task vector of model {index} has NaN/Inf entries")
        self.index = index


TrimFn = Callable[[torch.Tensor, int], tuple[torch.Tensor, int]]
"""(chunk of tau, index of its first entry) -> (trimmed chunk, entries kept); may work in place."""


@dataclass(frozen=True)
class TrimPlan:
    """How one model's task vector of one tensor is trimmed: whether it needs the whole tensor as
    one chunk, and, once the chunks are known, the function applied to each."""

    whole: bool
    start: Callable[[list[tuple[int, int]], dict[torch.dtype, torch.Tensor]], TrimFn]


def count(mask: torch.Tensor) -> int:
    """True entries of a boolean mask (a byte sum: faster than count_nonzero)."""
    return int(mask.view(torch.uint8).sum(dtype=torch.int64))


def _keep_all(t: torch.Tensor, start: int) -> tuple[torch.Tensor, int]:
    return t, t.numel()


Select = Callable[[torch.Tensor, int], tuple[torch.Tensor, "torch.Tensor | float"]]
"""(chunk of tau, index of its first entry) -> (keep mask, each entry's keep-probability or one for all)."""


def plan_trim(tau: TaskTensor, trim: Trim, params: Mapping[str, Any], tensor_name: str, model_index: int,
              stats: LayerStats | TokenCounts | None) -> TrimPlan:
    """The trim of one model's task vector for one tensor, as the method's `trim` kind and this
    model's parameters for this tensor say. Data-aware scores fall back to magnitude where the
    tensor has no (usable) statistics.

    Which entries are kept (`trim`): `topk`, the exact top-k of the score, per tensor (threshold
    gathered over the chunks first) or per row; `dare`, Bernoulli(d) with the `random` score, else
    keep-probabilities rising with the score's rank (`rank_probabilities`, whole tensor);
    `della`, probabilities d - eps .. d + eps by rank within each row (`della_probabilities`;
    a 1-D tensor is one row, so it is whole); `breadcrumbs`, the band below the `gamma` fraction
    of highest scores (band gathered over the chunks first). Then `rescale`: `inverse` divides each
    kept entry by its keep-probability, `l1` scales the tensor so its L1 norm is tau's (a sum over
    the whole tensor: whole), `none` keeps the values. Random draws are addressed by entry, so
    every chunked trim equals the whole-tensor one bit for bit.
    """
    d = float(params.get("density", 1.0))
    if trim == "none" or d >= 1.0:  # every kind keeps everything at density 1 (probabilities of 1, no band)
        return TrimPlan(False, lambda chunks, buffers: _keep_all)
    score = SCORES[params["score"]]
    compensate = bool(params.get("compensate"))
    if not isinstance(stats, LayerStats):  # an embedding's token counts rank no entries
        stats = None
    if stats is not None and (score.name == "sparsegpt" or compensate):
        try:
            stats.hinv_diag  # computed once per input group; raises if the statistics are unusable
        except DegenerateStatistics:
            stats = None
    if score.needs_stats and stats is None:
        score = SCORES["magnitude"]
    rescale = params.get("rescale", "none")
    l1 = rescale == "l1"
    if compensate and stats is not None:
        def compensated(t: torch.Tensor, start: int) -> tuple[torch.Tensor, int]:
            kept = obs_trim(t, stats.gram, d, stats.damp)
            return _l1_matched(t, kept) if l1 else kept, int(torch.count_nonzero(kept))
        return TrimPlan(True, lambda chunks, buffers: compensated)
    per_row = params.get("topk") == "row"
    stream = random_stream(int(params.get("seed", 0)), tensor_name, model_index)

    def rank(t: torch.Tensor) -> torch.Tensor:
        return score.fn(t, stats)

    def drawn(probabilities: Callable[[torch.Tensor], torch.Tensor]) -> Select:
        def select(t: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
            p = probabilities(t).to(t.device)
            return sample_mask(p, stream, start), p
        return select

    def gathered(selection: Callable[[torch.Tensor], TopK | Band]) -> Callable[..., Select]:
        def start(chunks: list[tuple[int, int]], buffers: dict[torch.dtype, torch.Tensor]) -> Select:
            chosen = selection(_gathered_scores(tau, rank, chunks, buffers)).mask
            return lambda t, begin: (chosen(rank(t)), 1.0)
        return start

    if trim == "dare" and score.selection == "bernoulli":
        plan = _plan(False, lambda t, start: (bernoulli_mask(t.shape, d, stream, start).to(t.device), d))
    elif trim == "dare":
        plan = _plan(True, drawn(lambda t: rank_probabilities(rank(t), d, per_row)))
    elif trim == "della":
        eps = float(params["epsilon"])
        plan = _plan(tau.weights.dim() < 2, drawn(lambda t: della_probabilities(rank(t), d, eps)))
    elif trim == "breadcrumbs":
        gamma = float(params["gamma"])
        plan = TrimPlan(False, gathered(lambda flat: breadcrumbs_band(flat, d, gamma)))
    elif per_row and tau.weights.dim() >= 2:
        plan = _plan(False, lambda t, start: (topk_mask(rank(t), d, per_row=True), 1.0))
    else:
        plan = TrimPlan(False, gathered(lambda flat: topk_threshold(flat, keep_count(flat.numel(), d))))
    return TrimPlan(plan.whole or l1, lambda chunks, buffers: _applied(plan.start(chunks, buffers), rescale))


def _plan(whole: bool, select: Select) -> TrimPlan:
    return TrimPlan(whole, lambda chunks, buffers: select)


def _applied(select: Select, rescale: str) -> TrimFn:
    """The trim of a chunk: entries `select` keeps, rescaled as `rescale` says."""
    def trim_chunk(t: torch.Tensor, start: int) -> tuple[torch.Tensor, int]:
        keep, p = select(t, start)
        if rescale == "inverse" and isinstance(p, torch.Tensor):
            kept = torch.where(keep, t / p, torch.zeros_like(t)).to(t.dtype)
        elif rescale == "inverse":
            kept = t.div_(p).mul_(keep)
        elif rescale == "l1":  # the chunk is the whole tensor (see plan_trim)
            kept = _l1_matched(t, t * keep)
        else:
            kept = t.mul_(keep)
        return kept, count(keep)
    return trim_chunk


def _l1_matched(tau: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    return kept.mul_(l1_factor(float(tau.abs().sum()), float(kept.abs().sum())))


def _gathered_scores(tau: TaskTensor, score: Callable[[torch.Tensor], torch.Tensor],
                     chunks: list[tuple[int, int]], buffers: dict[torch.dtype, torch.Tensor]) -> torch.Tensor:
    """The scores of the whole tensor, flat, gathered chunk by chunk into one buffer, so a per-tensor
    selection (top-k threshold, breadcrumbs band) is found once. The buffer has the score's dtype
    (float64 for data-aware scores, so phase 2 compares exactly) and is shared by the models of
    one tensor."""
    first = score(tau.rows(*chunks[0])).reshape(-1)
    if len(chunks) == 1:
        return first
    numel = tau.weights.numel()
    cols = numel // max(tau.weights.shape[0], 1)
    flat = buffers.get(first.dtype)
    if flat is None:
        flat = buffers[first.dtype] = torch.empty(numel, dtype=first.dtype, device=first.device)
    flat[: first.numel()] = first
    for start, stop in chunks[1:]:
        flat[start * cols: stop * cols] = score(tau.rows(start, stop)).reshape(-1)
    return flat


def _chunks(rows: int, cols: int, whole: bool) -> list[tuple[int, int]]:
    """Row ranges of about CHUNK_ELEMENTS entries; an even row count keeps chunk starts at even
    entries (see RandomStream)."""
    step = rows if whole else max(2, (CHUNK_ELEMENTS // max(cols, 1)) & ~1)
    return [(start, min(start + step, rows)) for start in range(0, rows, step)] or [(0, 0)]


def trim(tau: torch.Tensor, method: Method, params: Mapping[str, Any], tensor_name: str, model_index: int,
         stats: LayerStats | None = None) -> torch.Tensor:
    """The trimmed copy of one whole task vector (oriented out x in), as `method` trims it."""
    source = TaskTensor(tau)
    whole = [(0, tau.shape[0] if tau.dim() else 1)]
    plan = plan_trim(source, method.trim, {**method.defaults(), **params}, tensor_name, model_index, stats)
    return plan.start(whole, {})(source.rows(*whole[0]), 0)[0].reshape(tau.shape)


@dataclass(frozen=True)
class TensorPlan:
    """How one tensor is merged, everything but its data: the method and its values for this
    tensor (`params`; missing ones take the method's defaults), the models' weights and the values
    each model overrides for its own trim (`model_params[i]`), per-model factors of each trimmed
    task vector (`scales`), what the tensor is (its name, for messages and random streams; stored
    in x out, `transposed`, as GPT-2's Conv1D; a linear layer's weight, `linear`, where subspace
    methods use their matrix math), and how the result is written (`dtype`, `clamp`)."""

    method: Method
    weights: Sequence[float]
    params: Mapping[str, Any] = field(default_factory=dict)
    name: str = ""
    transposed: bool = False
    linear: bool = False
    model_params: Sequence[Mapping[str, Any]] | None = None
    scales: Sequence[float] | None = None
    dtype: torch.dtype | None = None
    clamp: bool = False


def merge_tensor(plan: TensorPlan, taus: Iterable[TaskTensor | torch.Tensor | None],
                 stats: Sequence[LayerStats | TokenCounts | None] | None = None,
                 base: torch.Tensor | None = None) -> tuple[torch.Tensor, int, int]:
    """`merge_parts` at the one scaling `plan.scales`: the merged tensor, entries kept, offered."""
    merged, kept, offered = merge_parts(plan, [plan.scales], taus, stats, base)
    return merged[0], kept, offered


def merge_parts(plan: TensorPlan, scalings: Sequence[Sequence[float] | None],
                taus: Iterable[TaskTensor | torch.Tensor | None],
                stats: Sequence[LayerStats | TokenCounts | None] | None = None,
                base: torch.Tensor | None = None) -> tuple[torch.Tensor, int, int]:
    """One tensor merged at each entry of `scalings` (as `plan.scales`, which is not read here),
    stacked: each the merged delta (or, given `base`, the merged weight `base + lambda * delta`) in
    `plan.dtype`; plus (entries kept, entries offered) for the density report. The task vectors are
    read and trimmed once for every scaling (`lambda: auto` and `learned` score a fine-tune's part
    at a time; a method's `parts` computes them together where it can).

    `scales[i]` multiplies model i's trimmed task vector before the method combines them (its
    weight, which also weighs its statistics, is untouched): for an additive method the merge is
    then sum_i scales[i] * (model i's part). A model without this tensor (None, e.g. a LoRA that
    did not target it) is what the method's `absent` says: skipped (it neither votes in TIES nor
    counts in a mean) or a zero task vector with its weight. All math sees a transposed tensor
    out x in. A task vector with NaN/Inf raises NonFiniteTaskVector naming the model; a merged
    value that is not finite, or beyond the range of `dtype`, raises OutOfRange (with `clamp`,
    values beyond the range are clamped to it instead; NaN is never clamped); a method's own
    divisor near zero raises `table.Unbounded`.
    """
    method, weights, tensor_name, transposed = plan.method, plan.weights, plan.name, plan.transposed
    model_params, dtype, clamp = plan.model_params, plan.dtype, plan.clamp
    params = plan.params
    values = {**method.defaults(), **(params or {})}
    given = [t if t is None or isinstance(t, TaskTensor) else TaskTensor(t) for t in taus]
    like = next((t.weights for t in given if t is not None), None)
    if like is None:
        raise ValueError(f"{tensor_name}: no task vector has this tensor")
    if method.absent == "zero":  # a zero of the tensor's shape that costs no memory
        zero = TaskTensor(torch.zeros((), dtype=torch.float32, device=like.device).expand(like.shape))
        given = [zero if t is None else t for t in given]
    present = [(i, t) for i, t in enumerate(given) if t is not None]
    if method.needs_base and base is None:
        raise ValueError(f"{method.name} needs the base weights of {tensor_name}")
    shape = present[0][1].weights.shape
    sources = [t.oriented(transposed) for _, t in present]
    used_stats = [stats[i] if stats else None for i, _ in present]
    own = [{**values, **(model_params[i] if model_params else {})} for i, _ in present]
    plans = [plan_trim(src, method.trim, p, tensor_name, i, s)
             for (i, _), src, p, s in zip(present, sources, own, used_stats)]
    rows = sources[0].weights.shape[0]
    cols = sources[0].weights.numel() // max(rows, 1)
    chunks = _chunks(rows, cols, not method.elementwise or any(p.whole for p in plans))
    buffers: dict[torch.dtype, torch.Tensor] = {}
    trims = [p.start(chunks, buffers) for p in plans]
    del buffers  # thresholds are found; the score buffer is not needed while merging
    w = torch.tensor([weights[i] for i, _ in present], dtype=torch.float32)
    local = [None if s is None else [s[i] for i, _ in present] for s in scalings]  # in the order of `present`
    out = torch.empty((len(scalings), *shape), dtype=dtype or torch.float32, device=sources[0].weights.device)
    targets = [orient(o, transposed) for o in out]
    reference = None if base is None else orient(base, transposed)
    lam = float(values.get("lambda", 1.0))
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
        rows = None if reference is None else reference[start:stop].to(torch.float32, copy=True)
        common = dict(params=values, stats=used_stats, base=rows if method.needs_base else None, linear=plan.linear)
        deltas = method.parts(trimmed, local, w, **common) if method.parts and len(local) > 1 else None
        if deltas is None:
            deltas = [method.combine(_scaled(trimmed, s), w, **common) for s in local]
        for target, delta in zip(targets, deltas):
            if rows is not None:  # one merge adds into its copy of the base's rows, several into new ones
                delta = rows.add_(delta, alpha=lam) if len(targets) == 1 else rows.add(delta, alpha=lam)
            target[start:stop] = fit(delta, out.dtype, clamp, tensor_name)
    return out, kept, len(present) * out[0].numel()


def _scaled(trimmed: Sequence[torch.Tensor], scales: Sequence[float] | None) -> list[torch.Tensor]:
    """The trimmed task vectors, each times its model's scale (a factor of 1 leaves it as it is, a
    factor of 0 is a zero that costs no memory: one fine-tune's part alone, of an embedding at 7B
    widths, would otherwise copy every other fine-tune's 0.5 GB of zeros)."""
    if scales is None:
        return list(trimmed)
    return [t if s == 1.0 else t.new_zeros(()).expand_as(t) if s == 0.0 else t * s for t, s in zip(trimmed, scales)]


def fit(values: torch.Tensor, dtype: torch.dtype, clamp: bool, tensor_name: str) -> torch.Tensor:
    """Values as they may be cast to `dtype`: finite and in range (see merge_tensor); every
    floating-point tensor written passes here, merged or copied from the base."""
    if values.numel() == 0:
        return values
    limit = torch.finfo(dtype).max if dtype.is_floating_point else None
    peak = float(values.abs().max())
    if math.isnan(peak) or (math.isinf(peak) and not clamp):
        bad = values[~torch.isfinite(values)][0]
        raise OutOfRange(tensor_name, float(bad), dtype)
    if limit is not None and peak > limit:
        if not clamp:
            raise OutOfRange(tensor_name, float(values.flatten()[values.abs().argmax()]), dtype)
        values = values.clamp(-limit, limit)
    return values
