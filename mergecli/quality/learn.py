"""`lambda: learned`: a scale for each fine-tune's part of the merge in each layer, learned on
held-out calibration windows (never on evaluation text).

Why: an additive merge (task arithmetic, RegMean, ...) is a sum of one part per fine-tune,
theta = theta_base + sum_i part_i (RegMean's part_i is tau_i G~_i (sum_j G~_j)^-1, with every
fine-tune's statistics). One scale for the whole sum (`lambda: auto`) cannot give a fine-tune
whose domain the merge serves worst more room in the modules where it needs it; one scale per
module of each layer and fine-tune can: theta(s) = theta_base + sum_i s_{group(t), i} part_i for
each tensor t, group = a layer's attention, MLP or norm (`group_of`).
The scales start at 1 (the method's own merge) and follow the gradient of the score the
benchmark reports: the mean gain retained over the fine-tunes' domains, whose per-window form is
sum_d NLL_d / (NLL_base,d - NLL_own,d) (Adam, `EPOCHS` passes over the windows, `BATCH` windows
of each domain per step). It is layer-wise AdaMerging (Yang et al. 2024) with next-token loss on
calibration text instead of entropy on test inputs, over a data-aware method's parts.

Windows: two sets drawn as `lambda: auto`'s (`search.scoring`: one window per document), the
scales learn on `WINDOWS` per fine-tune (seed `calibration.seed + 1`; with 16, or with packed
windows from a few long documents, they fitted their windows and kept less of the gain on held-out
documents, see benchmarks/quality-results.md) and are selected on `search.SAMPLES` others (seed
`+ 2`): after each pass the second set is scored and the best scales seen -- the start included,
judged with the forgetting term below -- are kept, so
the merge never scores below the method's own merge on windows it did not learn from, and scales
that fit the learning windows but not others are not taken. A fine-tune that does not beat the
base on its windows still gets scales (they follow the other domains' loss) but no term of its own.
Forgetting: the domains' text says nothing of what the base knew, so the scales are also held to
other text (`forgetting_text`, as many windows as each set, seeds + 1 and + 2): the calibration
part of `calibration.general` when the recipe gives text no fine-tune trained on, else text the
base samples itself (`basetext`). Each step adds the excess of the batch's NLL there over the
method's own merge (every scale 1), if positive, divided by the mean gap between base and
fine-tune, and a pass is judged by its selection gain less that excess on the selection text. One
nat of excess costs one mean gap of gain (not tuned). The base's samples are a proxy: on testbed B
they put the learned merge below RegMean there, yet on the held-out general text (the Jargon File)
it sat +0.012 log-PPL above RegMean; held to other documents of that text it read the held-out
ones 2.5% better, below RegMean and task arithmetic, for half a point of gain
(benchmarks/quality-results.md).
Cost: one merge per fine-tune to compute its part, the base's text sampled (without general text),
then `EPOCHS` x (forward + backward) over the windows. Memory: the base and every part in fp32
beside the model (fine-tunes + 2 copies of the model), plus the weights and activations of one step
(2 x (domains + 1) windows) with their gradients.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from .search import SAMPLES, merged_delta, placed, scoring, with_param

if TYPE_CHECKING:
    import torch

    from ..engine.calibration import Windows
    from ..models.architecture import Architecture
    from ..recipe.schema import MergeSpec
    from .search import Scoring
    from ..stages.base import Context
    from ..engine.hessian_set import HessianSet

WINDOWS = 32  # per fine-tune to learn on (at most calibration.samples); selected on `search.SAMPLES` others
EPOCHS = 8
BATCH = 2  # windows of each domain per step
LEARNING_RATE = 0.05
HELD_TO = ""  # the text held to (`forgetting_text`) among a step's batches (no domain has an empty name)


def settings(ctx: "Context") -> dict[str, Any]:
    """What the learned scales depend on beyond the domains' windows (part of the merge's key): the
    text they are held to is `calibration.general` as it is now, else the base's own samples."""
    from ..recipe.datasets import fingerprint
    from ..errors import MergeCliError

    general = ctx.recipe.calibration.general
    forgetting: Any = "base text (no generation defaults), hinge at scale 1"
    if general is not None:
        try:
            forgetting = {"text": fingerprint(general, ctx.recipe.root).model_dump(mode="json"), "hinge": "scale 1"}
        except MergeCliError as exc:  # before any scale is learned, naming the field
            raise MergeCliError(f"calibration.general: {exc.message}", exc.hint) from None
    return {"windows": WINDOWS, "epochs": EPOCHS, "batch": BATCH, "learning_rate": LEARNING_RATE,
            "groups": "layer module", "forgetting": forgetting}


def forgetting_text(ctx: "Context", model: "torch.nn.Module", sets: list["Scoring"]) -> tuple[str, list["Windows"]]:
    """The text the scales are held to, in words, and as many windows of it as each set of the
    domains' (seeds + 1, + 2): windows of `calibration.general`'s calibration part, drawn as the
    domains' are (its held-out part, which the eval stage may read, is never touched), else text the
    base samples itself."""
    from .basetext import sample_windows
    from ..engine.calibration import draw_windows, load_texts
    from ..recipe.datasets import describe_spec
    from ..models.loading import load_tokenizer

    cal = ctx.recipe.calibration
    if cal.general is None:
        return "text sampled from the base", [
            sample_windows(model, on.count, cal.seq_len, cal.seed + 1 + k, cal.batch_size, on.device)
            for k, on in enumerate(sets)]
    tokenizer = load_tokenizer(ctx.base.path)
    texts = load_texts(cal.general, ctx.recipe.root, tokenizer)
    source = describe_spec(cal.general)
    return f"calibration.general ({source})", [
        draw_windows(texts, tokenizer, on.count, cal, cal.seed + 1 + k,
                     f"calibration part of calibration.general (dataset {source})") for k, on in enumerate(sets)]


def group_of(arch: "Architecture", name: str) -> str:
    """The scales' unit: a module of a decoder layer (its attention, its MLP, each norm: the name's
    part after the layer index), or a tensor outside the stack on its own (embedding, final norm,
    an untied lm_head)."""
    layer = arch.layer_of(name)
    if layer is None:
        return name
    return f"layer {layer} {name.split(f'.{layer}.', 1)[1].split('.')[0]}"


@dataclass(frozen=True)
class Learned:
    """The outcome, for the model card, the stamp and --json."""

    models: list[str]  # the fine-tunes, in the order of each row of `scales`
    scales: dict[str, list[float]]  # group -> one scale per fine-tune
    start: float  # mean gain retained on the selection windows at scale 1 (the method's own merge)
    score: float  # ... with the scales kept
    trace: list[float]  # ... after each epoch (the start first)
    forgetting: list[float]  # NLL on the text held to over the start's, same points as `trace`
    held_to: str  # that text, in words
    kept: int  # the pass kept (0: the start)
    domains: list[str]
    windows: int  # per domain, learned on
    selected_on: int  # per domain, other windows
    seq_len: int
    seconds: float
    parameter: str = "lambda"
    mode: str = "learned"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def scales_of(self, arch: "Architecture"):
        """`merging.VariantPlan.scales`: a tensor's factor per fine-tune (None outside any group)."""
        return lambda name: self.scales.get(group_of(arch, name))


def learn_scales(ctx: "Context", merge: "MergeSpec", vectors: list, hessians: list["HessianSet"] | None,
                 workers: int) -> Learned:
    import torch
    from rich.markup import escape

    from .gain import mean_nll
    from ..engine.perplexity import window_nlls

    begin = time.perf_counter()
    names = [m.name for m in ctx.recipe.models_of(merge)]
    cal = ctx.recipe.calibration
    learn_on, select_on = scoring(ctx, merge, "lambda: learned", samples=(WINDOWS, SAMPLES))
    model, device = learn_on.model, learn_on.device
    held_to, text = forgetting_text(ctx, model, [learn_on, select_on])
    unit = with_param(merge, "lambda", 1.0)
    stacked: dict[str, torch.Tensor] = {}  # tensor -> one row per fine-tune
    for i in range(len(names)):  # each fine-tune's part: the merge with only its task vector, at scale 1
        one = [float(i == j) for j in range(len(names))]
        part = merged_delta(ctx, unit, vectors, hessians, workers, scales=lambda _, one=one: one)
        while part:  # into its row, tensor by tensor: the parts are held once (a tensor no part changes is absent)
            n, delta = part.popitem()
            if n not in stacked:
                stacked[n] = delta.new_zeros((len(names), *delta.shape))
            stacked[n][i] = delta
    tensors = sorted(stacked)
    state = placed(merge, "lambda: learned", tensors, learn_on.model)
    base = {n: state[n].detach().to(torch.float32, copy=True) for n in tensors}
    groups = sorted({group_of(ctx.arch, n) for n in tensors}, key=_order)
    row = {n: groups.index(group_of(ctx.arch, n)) for n in tensors}

    def weight(n: str, scales: torch.Tensor) -> torch.Tensor:
        return base[n] + torch.tensordot(scales[row[n]], stacked[n], dims=1)

    def place(scales: torch.Tensor) -> None:  # tensor by tensor: no second copy of the model
        with torch.no_grad():
            for n in tensors:
                state[n].copy_(weight(n, scales))

    label = f"learning scales {merge.name}"
    scales = torch.ones(len(groups), len(names), dtype=torch.float32, device=device, requires_grad=True)
    place(scales.detach())
    start = select_on.gain()
    # the method's own merge on the text held to: the level the learned scales may not exceed
    reference = [window_nlls(model, t, cal.batch_size, device) for t in text]
    per_window = torch.tensor([s / n for s, n in reference[0]], device=device)
    forget = [0.0]
    gap = sum(select_on.gap(d) for d in select_on.domains) / len(select_on.domains)
    kept, pass_kept, trace = scales.detach().clone(), 0, [start]

    def judged(k: int) -> float:  # pass k's gain, less what it forgot beyond the start, in mean gaps
        return trace[k] - max(forget[k], 0.0) / gap

    ctx.reporter.log(f"{label}: scale 1 keeps {100 * start:.1f}% of the gain on the selection windows")
    if cal.general is None:
        ctx.reporter.log(f"{label}: held to text sampled from the base, a proxy for what it knew; set "
                         "calibration.general to text no fine-tune trained on to hold the merge to that")
    steps, batches = _epochs({**{d: len(learn_on.windows[d].input_ids) for d in learn_on.domains},
                              HELD_TO: learn_on.count})
    optimizer = torch.optim.Adam([scales], lr=LEARNING_RATE)
    generator = torch.Generator().manual_seed(cal.seed + 1)
    with ctx.reporter.track(label, EPOCHS * steps) as advance:
        for epoch in range(EPOCHS):
            for batch in batches(generator):
                optimizer.zero_grad()
                current = {n: weight(n, scales) for n in tensors}
                pick = batch.pop(HELD_TO)
                excess = (_window_means(learn_on, current, text[0], pick) - per_window[pick]).mean()
                (_loss(learn_on, current, batch) + excess.clamp(min=0) / gap).backward()
                optimizer.step()
                advance(1)
            place(scales.detach())
            value = select_on.gain()
            forgot = mean_nll(window_nlls(model, text[1], cal.batch_size, device)) - mean_nll(reference[1])
            trace.append(value)
            forget.append(forgot)
            ctx.reporter.log(f"{label}: epoch {epoch + 1} keeps {100 * value:.1f}% of the gain on the selection "
                             f"windows, {forgot:+.4f} NLL on {escape(held_to)}")
            if judged(epoch + 1) > judged(pass_kept):
                kept, pass_kept = scales.detach().clone(), epoch + 1
    return Learned(names, {g: [round(float(v), 6) for v in kept[i]] for i, g in enumerate(groups)}, start,
                   trace[pass_kept], trace, forget, held_to, pass_kept, select_on.domains, learn_on.count,
                   select_on.count, cal.seq_len, round(time.perf_counter() - begin, 3))


def _epochs(count: dict[str, int]):
    """Steps per epoch, and one epoch's batches drawn by a generator: per step, `BATCH` windows of
    each set (a set with fewer windows than the others starts over)."""
    import torch

    steps = math.ceil(max(count.values()) / BATCH)

    def epoch(generator: "torch.Generator") -> list[dict[str, "torch.Tensor"]]:
        order = {d: torch.randperm(n, generator=generator) for d, n in count.items()}
        return [{d: order[d][[(step * BATCH + b) % count[d] for b in range(BATCH)]] for d in count}
                for step in range(steps)]
    return steps, epoch


def _window_means(on: "Scoring", weights: dict[str, "torch.Tensor"], windows: "Windows",
                  pick: "torch.Tensor") -> "torch.Tensor":
    """The token-mean NLL of each picked window under `weights` (differentiable)."""
    from torch.func import functional_call

    from ..engine.perplexity import next_token_nll

    ids = windows.input_ids[pick].to(on.device)
    mask = windows.attention_mask[pick].to(on.device)
    logits = functional_call(on.model, weights, (), {"input_ids": ids, "attention_mask": mask,
                                                      "use_cache": False}).logits
    nll, valid = next_token_nll(logits, ids, mask)
    return (nll * valid).sum(dim=1) / valid.sum(dim=1).clamp(min=1)


def _loss(on: "Scoring", weights: dict[str, "torch.Tensor"], batch: dict[str, "torch.Tensor"]) -> "torch.Tensor":
    """The score to descend: mean over domains of the batch's NLL divided by the domain's gap
    between the base and its fine-tune (so a domain weighs by how much gain there is to keep, as in
    the mean gain retained)."""
    return sum(_window_means(on, weights, on.windows[d], pick).mean() / on.gap(d) for d, pick in batch.items()) \
        / len(batch)


def card_lines(learned: dict[str, Any]) -> list[str]:
    """The model card's account of the scales (`Learned.as_dict()`): how they were learned, what
    they bought on the selection windows, and every value."""
    trace = ", ".join(f"{100 * v:.1f}%" for v in learned["trace"][1:])
    lines = [f"lambda: learned: one scale per module of each layer and fine-tune, learned on {learned['windows']} "
             f"held-out calibration windows of {learned['seq_len']} tokens per fine-tune, spread over its documents "
             f"({', '.join(learned['domains'])}) and selected on {learned['selected_on']} others. On those the "
             f"merge keeps {100 * learned['score']:.1f}% of the fine-tunes' gain, {100 * learned['start']:.1f}% "
             f"with every scale 1 (after each epoch: {trace}). Held to {learned['held_to']}: its NLL there "
             f"is {learned['forgetting'][learned['kept']]:+.4f} from the merge with every scale 1 (after each epoch: "
             f"{', '.join(f'{v:+.4f}' for v in learned['forgetting'][1:])}); pass {learned['kept']} kept "
             "(0: every scale 1).", "",
             "| tensors | " + " | ".join(learned["models"]) + " |", "|---|" + "---|" * len(learned["models"])]
    lines += [f"| {group} | " + " | ".join(f"{v:.3f}" for v in values) + " |"
              for group, values in learned["scales"].items()]
    return lines


def _order(group: str) -> tuple[int, int, str]:
    """Layers in depth order after the tensors outside the stack."""
    return (1, int(group.split()[1]), group) if group.startswith("layer ") else (0, 0, group)
