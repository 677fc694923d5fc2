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

Windows: two sets drawn as `lambda: auto`'s (`scoring.scoring_sets`: one window per document), the
scales learn on `WINDOWS` per fine-tune (seed `calibration.seed + 1`; with 16, or with packed
windows from a few long documents, they fitted their windows and kept less of the gain on held-out
documents, see benchmarks/quality-results.md) and are selected on `search.SAMPLES` others (seed
`+ 2`): after each pass the second set is scored and the best scales seen -- the start included,
judged with the forgetting term below -- are kept, so the merge never scores below the method's
own merge on windows it did not learn from, and scales that fit the learning windows but not
others are not taken. A fine-tune that does not beat the base on its windows still gets scales
(they follow the other domains' loss) but no term of its own.
Forgetting: the domains' text says nothing of what the base knew, so the scales are also held to
other text (`forgetting_text`, as many windows as each set, seeds + 1 and + 2): the calibration
part of `calibration.general` when the recipe gives text no fine-tune trained on, else text the
base samples itself (`basetext`). Each step adds the excess of the batch's NLL there over the
method's own merge (every scale 1), if positive, divided by the mean gap between base and
fine-tune (an excess within `TOLERANCE` of 0 is none: rounding must not decide a step), and a
pass is judged by its selection gain less that excess on the selection text. One nat of excess
costs one mean gap of gain (not tuned). The base's samples are a proxy: on testbed B
they put the learned merge below RegMean there, yet on the held-out general text (the Jargon File)
it sat +0.012 log-PPL above RegMean; held to other documents of that text it read the held-out
ones 2.5% better, below RegMean and task arithmetic, for half a point of gain
(benchmarks/quality-results.md).

Block by block (`engine.streamed`): the parts are files in the workspace (one per fine-tune,
written once by the merge engine, read back a tensor at a time); each step runs its windows
forward through theta(s) one decoder block at a time, keeping only the blocks' input hidden
states, then backward block by block, each block recomputed from its input; the gradient of each
weight, dL/dW, is reduced at once to dL/ds_{g,i} = <dL/dW, part_i> and dropped. Memory: the
modules outside the stack and one block (weights and their gradients, a part's tensor at a time)
plus the hidden states at block boundaries of a step's windows: independent of depth. Under
torchrun every process takes its share of each step's windows and of every scoring pass; the
gradients of the scales are added up over the processes.
Cost: every fine-tune's part merged in one pass over the tensors (RegMean's Gram sums factored
once for all of them: `engine.writer.write_parts`); the base's text sampled (without general text, with the
base loaded whole: the one step that holds a model); then `EPOCHS` x (steps of a forward and a
backward with one recomputed forward, through the blocks, over 2 x (domains + 1) windows) and a
selection pass after each.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

from ..engine.calibration import DRAW, draw_windows
from ..engine.streamed import window_means
from .gain import mean_nll
from .scales import WRITTEN, Choice, Chooser, Setting, group_order
from .scoring import plus, scoring_sets, shared_nlls
from .search import SAMPLES
from ..models.loading import load_causal_lm
from .basetext import sample_windows

if TYPE_CHECKING:
    import torch

    from ..distributed import Group
    from ..engine.calibration import Windows
    from ..engine.streamed import StoredWeights, Weights

WINDOWS = 32  # per fine-tune to learn on (at most calibration.samples); selected on `search.SAMPLES` others
EPOCHS = 8
BATCH = 2  # windows of each domain per step
LEARNING_RATE = 0.05
HELD_TO = ""  # the text held to (`forgetting_text`) among a step's batches (no domain has an empty name)
TOLERANCE = 1e-6  # nats: an excess over the start's NLL within fp32 rounding is none (see `_hinge`)


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


class LearnedScales(Chooser):
    """One scale per layer module and fine-tune, learned on calibration windows."""

    mode = "learned"
    parts = "each"

    def key(self, datasets: Callable[[], list[dict[str, Any]]], calibration: dict[str, Any],
            general: Callable[[], dict[str, Any] | None]) -> dict[str, Any]:
        text = general()
        forgetting: Any = ("base text (no generation defaults), hinge at scale 1" if text is None
                           else {"text": text, "hinge": "scale 1"})
        return {"datasets": datasets(), "calibration": calibration, "samples": SAMPLES, "draw": DRAW,
                "windows": WINDOWS, "epochs": EPOCHS, "batch": BATCH, "learning_rate": LEARNING_RATE,
                "groups": "layer module", "forgetting": forgetting, "hinge tolerance": TOLERANCE,
                "run": "block by block", "written": WRITTEN}

    def choose(self, setting: Setting, parts: Sequence["StoredWeights"]) -> Choice:
        learned = learn_scales(setting, parts)
        return Choice(lam=1.0, scales=learned.scales, record=learned.as_dict())

    def log_line(self, record: dict[str, Any]) -> str:
        return (f"scales per layer module and fine-tune learned on calibration windows (the merge keeps "
                f"{100 * record['score']:.1f}% of the gain on the selection windows; {100 * record['start']:.1f}% "
                f"at scale 1; on {record['held_to']} {record['forgetting'][record['kept']]:+.4f} NLL from scale 1)")

    def card_lines(self, record: dict[str, Any]) -> list[str]:
        """How the scales were learned, what they bought on the selection windows, and every value."""
        trace = ", ".join(f"{100 * v:.1f}%" for v in record["trace"][1:])
        lines = [f"lambda: learned: one scale per module of each layer and fine-tune, learned on {record['windows']} "
                 f"held-out calibration windows of {record['seq_len']} tokens per fine-tune, spread over its "
                 f"documents ({', '.join(record['domains'])}) and selected on {record['selected_on']} others. On "
                 f"those the merge keeps {100 * record['score']:.1f}% of the fine-tunes' gain, "
                 f"{100 * record['start']:.1f}% with every scale 1 (after each epoch: {trace}). Held to "
                 f"{record['held_to']}: its NLL there is {record['forgetting'][record['kept']]:+.4f} from the merge "
                 f"with every scale 1 (after each epoch: {', '.join(f'{v:+.4f}' for v in record['forgetting'][1:])}); "
                 f"pass {record['kept']} kept (0: every scale 1).", "",
                 "| tensors | " + " | ".join(record["models"]) + " |", "|---|" + "---|" * len(record["models"])]
        lines += [f"| {group} | " + " | ".join(f"{v:.3f}" for v in values) + " |"
                  for group, values in record["scales"].items()]
        return lines


def forgetting_text(setting: Setting, counts: Sequence[int]) -> tuple[str, list["Windows"]]:
    """The text the scales are held to, in words, and `counts[k]` windows of it for each set
    (seeds + 1, + 2): windows of `calibration.general`'s calibration part, drawn as the domains'
    are (its held-out part, which the eval stage may read, is never touched), else text the base
    samples itself (with the base loaded whole; under torchrun by rank 0, for every process)."""
    import torch


    cal = setting.calibration
    if setting.general is not None:
        texts, source = setting.general
        return f"calibration.general ({source})", [
            draw_windows(texts, setting.tokenizer, count, cal, cal.seed + 1 + k,
                         f"calibration part of calibration.general (dataset {source})")
            for k, count in enumerate(counts)]

    def sampled() -> list["Windows"]:
        model = load_causal_lm(setting.base_source, setting.base_source.path).to(setting.device)
        found = [sample_windows(model, count, cal.seq_len, cal.seed + 1 + k, cal.batch_size, setting.device)
                 for k, count in enumerate(counts)]
        del model
        return found
    with torch.no_grad():
        return "text sampled from the base", setting.dist.decide(sampled)


def learn_scales(setting: Setting, parts: Sequence["StoredWeights"]) -> Learned:
    import torch

    begin = time.perf_counter()
    cal, runner, reporter, dist = setting.calibration, setting.runner, setting.reporter, setting.dist
    learn_on, select_on = scoring_sets(runner, setting.base, setting.domains, setting.tokenizer, cal,
                                       (WINDOWS, SAMPLES), setting.merge, "lambda: learned", dist)
    held_to, text = forgetting_text(setting, [learn_on.count, select_on.count])
    names = sorted({n for part in parts for n in part.names})
    groups = sorted({setting.group_of(n) for n in names}, key=group_order)
    row = {n: groups.index(setting.group_of(n)) for n in names}

    def assembled(scales: "torch.Tensor") -> "Weights":
        return plus(setting.base, parts, lambda name, i: float(scales[row[name], i]) if name in row else None)

    label = f"learning scales {setting.merge}"
    scales = torch.ones(len(groups), len(parts), dtype=torch.float32, requires_grad=True)
    start = select_on.gain(assembled(scales.detach()))
    # the method's own merge on the text held to: the level the learned scales may not exceed
    reference = [shared_nlls(runner, assembled(scales.detach()), t, cal.batch_size, dist) for t in text]
    per_window = torch.tensor([s / n for s, n in reference[0]])
    forget = [0.0]
    gap = select_on.mean_gap()
    kept, pass_kept, trace = scales.detach().clone(), 0, [start]

    def judged(k: int) -> float:  # pass k's gain, less what it forgot beyond the start, in mean gaps
        return trace[k] - max(forget[k], 0.0) / gap

    reporter.log(f"{label}: scale 1 keeps {100 * start:.1f}% of the gain on the selection windows")
    if setting.general is None:
        reporter.log(f"{label}: held to text sampled from the base, a proxy for what it knew; set "
                     "calibration.general to text no fine-tune trained on to hold the merge to that")
    steps, batches = _epochs({**{d: len(learn_on.windows[d].input_ids) for d in learn_on.domains},
                              HELD_TO: learn_on.count})
    windows = BATCH * (len(learn_on.domains) + 1)
    selection = sum(len(w.input_ids) for w in select_on.windows.values()) + len(text[1].input_ids)
    reporter.log(f"{label}: {EPOCHS} passes of {steps} steps; each step a forward and a backward pass (one block "
                 f"recomputed at a time) over {windows} windows of {cal.seq_len} tokens through "
                 f"{len(runner.layers)} blocks, and after each pass {selection} selection windows forward: "
                 f"{EPOCHS * steps * windows * len(runner.layers)} window-block evaluations with their gradients")
    optimizer = torch.optim.Adam([scales], lr=LEARNING_RATE)
    generator = torch.Generator().manual_seed(cal.seed + 1)
    gaps = {d: learn_on.gap(d) for d in learn_on.domains}
    with reporter.track(label, EPOCHS * steps) as advance:
        for epoch in range(EPOCHS):
            for step, batch in enumerate(batches(generator)):
                tick = time.perf_counter()
                pick = batch.pop(HELD_TO)
                chosen = [(learn_on.windows[d], batch[d]) for d in batch] + [(text[0], pick)]

                def loss(values: list["torch.Tensor"], order: list[str] = list(batch), pick=pick) -> "torch.Tensor":
                    domain = sum(v.mean() / gaps[d] for v, d in zip(values, order)) / len(order)
                    return domain + _hinge((values[-1] - per_window[pick]).mean()) / gap

                optimizer.zero_grad()
                scales.grad = _gradient(runner, assembled(scales.detach()), parts, row, chosen, loss, cal.batch_size,
                                        dist, scales.shape)
                optimizer.step()
                advance(1)
                if epoch == step == 0:
                    first = time.perf_counter() - tick
                    reporter.log(f"{label}: the first step took {first:.1f} s: about "
                                 f"{EPOCHS * steps * first / 60:.0f} min of steps in all")
            value = select_on.gain(assembled(scales.detach()))
            forgot = (mean_nll(shared_nlls(runner, assembled(scales.detach()), text[1], cal.batch_size, dist))
                      - mean_nll(reference[1]))
            trace.append(value)
            forget.append(forgot)
            reporter.log(f"{label}: epoch {epoch + 1} keeps {100 * value:.1f}% of the gain on the selection windows, "
                         f"{forgot:+.4f} NLL on {held_to}")
            if judged(epoch + 1) > judged(pass_kept):
                kept, pass_kept = scales.detach().clone(), epoch + 1
    return Learned(setting.models, {g: [round(float(v), 6) for v in kept[i]] for i, g in enumerate(groups)}, start,
                   trace[pass_kept], trace, forget, held_to, pass_kept, select_on.domains, learn_on.count,
                   select_on.count, cal.seq_len, round(time.perf_counter() - begin, 3))


def _gradient(runner: Any, weights: "Weights", parts: Sequence["StoredWeights"], row: dict[str, int],
              chosen: list[tuple["Windows", "torch.Tensor"]],
              loss: Callable[[list["torch.Tensor"]], "torch.Tensor"], batch_size: int, dist: "Group",
              shape: tuple[int, ...]) -> "torch.Tensor":
    """d loss / d scales for one step: the chosen windows of each set run forward and backward
    block by block, each weight's gradient reduced at once to <dL/dW, part_i> for its group's row
    (fp64 sums). Under torchrun each process runs its share of every set's windows; the loss sees
    every process's statistics (the others' without gradient), and the gradients are added up."""
    import torch

    grad = torch.zeros(shape, dtype=torch.float64)

    def on_grad(name: str, g: "torch.Tensor") -> None:
        r = row.get(name)
        if r is None:
            return
        flat = g.reshape(-1)
        for i, part in enumerate(parts):
            p = part([name]).get(name)
            if p is not None:
                grad[r, i] += float(torch.dot(flat, p.reshape(-1).to(flat.device, flat.dtype)))

    local = []  # (set index, ids, mask) of this process's windows
    for k, (windows, pick) in enumerate(chosen):
        share = dist.share(len(pick)) if dist.launched else range(len(pick))
        if len(share):
            mine = pick[share.start:share.stop]
            local.append((k, windows.input_ids[mine], windows.attention_mask[mine]))

    def shared_loss(values: list["torch.Tensor"]) -> "torch.Tensor":
        if not dist.launched:
            return loss(values)
        parts_of = dist.gather([(k, v.detach().cpu()) for (k, _, _), v in zip(local, values)])
        full: list[list["torch.Tensor"]] = [[] for _ in chosen]
        for rank, found in enumerate(parts_of):
            for j, (k, v) in enumerate(found):
                full[k].append(values[j] if rank == dist.rank else v.to(values[0].device))
        return loss([torch.cat(f) for f in full])

    if local:
        runner.gradients(weights, [(ids, mask) for _, ids, mask in local], on_grad, window_means, shared_loss)
    elif dist.launched:
        dist.gather([])  # no window of this step here: the others' loss still waits for this process
    return dist.all_sum(grad).float() if dist.launched else grad.float()


def _hinge(excess: "torch.Tensor") -> "torch.Tensor":
    """The excess where it is more than `TOLERANCE`, else 0. At the start (every scale 1) the excess
    is 0 up to rounding, and which way the rounding falls (the same windows in batches of other
    sizes, or shared by other processes) would switch the whole term's gradient on or off: a step
    decided by rounding. Above the tolerance the hinge is the plain max(excess, 0)."""
    import torch

    return torch.where(excess > TOLERANCE, excess, torch.zeros_like(excess))


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
