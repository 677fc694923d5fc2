"""`lambda: auto`: a merge's scale chosen on held-out calibration windows, never on evaluation text.

Why: a merged task vector is rarely best at scale 1. Task arithmetic sums N task vectors (its best
scale on the quality benchmark is near 1/N, and at 1 it keeps far less of the gain), TIES averages
the agreeing ones, RegMean solves a least-squares problem per layer whose errors compound over
depth. theta(lambda) = theta_base + lambda * delta is one line through weight space, and the
merge's score along it -- the mean gain retained over the fine-tunes' domains (`gain.py`, the
metric `compare` reports) -- costs one forward pass over a few windows per domain per candidate:
the merged delta is computed once, by the same engine that writes the merge.

Windows: `SAMPLES` windows of `calibration.seq_len` tokens from each fine-tune's calibration part,
drawn with seed `calibration.seed + 1` (other windows than the hessian stage's; the held-out part
the eval stage reads is never touched), one per document, as the hessian stage draws them
(`calibration.draw_windows`: packed windows of a corpus of long files come from a handful of them
and judge a merge by those files).
References: the base and each fine-tune on its own windows; a fine-tune that does not beat the
base there is left out of the score (as in compare).
Search: golden section on `BRACKET` to `TOLERANCE`, both ends evaluated too, so a best scale at
the edge is seen (at most `EVALUATIONS` forward passes per domain).
Memory: the base and the merged delta in fp32 beside the model being scored: about three fp32
copies of the model (SmolLM2-135M: 1.6 GB).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Iterable

from .gain import mean_gain, mean_nll
from ..methods.coefficients import golden_max

if TYPE_CHECKING:
    from ..recipe.schema import MergeSpec
    from ..stages.base import Context
    from ..engine.hessian_set import HessianSet

SAMPLES = 16
BRACKET = (0.0, 2.0)
TOLERANCE = 0.05
EVALUATIONS = 12


@dataclass(frozen=True)
class Search:
    """The outcome: the chosen value and every candidate's score (mean gain retained on the
    calibration windows), for the model card, the stamp and --json."""

    parameter: str
    chosen: float
    score: float
    trace: dict[str, float]  # candidate (as text, sorted) -> score
    domains: list[str]  # fine-tunes whose gain the score averages
    windows: int  # per domain
    seq_len: int
    seconds: float  # the search's wall time (the merge's reported time includes it)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def key_of(ctx: "Context", merge: "MergeSpec") -> dict[str, Any] | None:
    """What the choice depends on beyond the variant itself (the merge's cache key holds it): the
    calibration text of each merged fine-tune, the calibration settings and this search's own."""
    if not merge.searched:
        return None
    from ..engine.calibration import DRAW
    from ..recipe.datasets import fingerprint
    from .learn import settings
    from ..methods.table import LEARNED
    from ..recipe.schema import key_view

    own = (settings(ctx) if merge.params.get("lambda") == LEARNED
           else {"bracket": list(BRACKET), "tolerance": TOLERANCE, "evaluations": EVALUATIONS})
    return {"datasets": [fingerprint(m.dataset, ctx.recipe.root).model_dump(mode="json")
                         for m in ctx.recipe.models_of(merge) if m.dataset is not None],
            "calibration": key_view(ctx.recipe.calibration, exclude={"general"}),  # general: in `own`, if read
            "samples": SAMPLES, "draw": DRAW, **own}


def with_param(merge: "MergeSpec", name: str, value: Any) -> "MergeSpec":
    """A copy of the variant with one parameter set."""
    copy = merge.model_copy(deep=True)
    copy.__pydantic_extra__[name] = value
    return copy


@dataclass
class Scoring:
    """What a candidate merge is scored against: each domain's held-out calibration windows, the
    base's and each fine-tune's NLLs on them (the references of the gain), and the base model
    loaded, whose weights a candidate overwrites in place."""

    windows: dict[str, Any]  # domain -> calibration.Windows
    reference: dict[str, list[tuple[float, int]]]  # the base, per domain
    own: dict[str, list[tuple[float, int]]]  # each fine-tune on its own domain
    model: Any  # the base, loaded on the device
    batch_size: int
    device: Any

    @property
    def domains(self) -> list[str]:
        return list(self.reference)

    def losses(self) -> dict[str, list[tuple[float, int]]]:
        from ..engine.perplexity import window_nlls

        return {n: window_nlls(self.model, self.windows[n], self.batch_size, self.device) for n in self.domains}

    def gain(self) -> float:
        """Mean gain retained by the model's current weights."""
        return mean_gain(self.reference, self.own, self.losses())

    @property
    def count(self) -> int:
        """Windows per domain (the fewest, should a fine-tune's text give fewer)."""
        return min(len(w.input_ids) for w in self.windows.values())

    def gap(self, domain: str) -> float:
        """What the fine-tune gains over the base on its domain's windows (mean NLL)."""
        return mean_nll(self.reference[domain]) - mean_nll(self.own[domain])


def scoring(ctx: "Context", merge: "MergeSpec", what: str, samples: tuple[int, ...] = (SAMPLES,)) -> list[Scoring]:
    """Windows and references for scoring merges of `merge`'s fine-tunes: one differently seeded set
    (`calibration.seed + 1`, `+ 2`, ...) per entry of `samples`, of that many windows per fine-tune
    (at most `calibration.samples`), sharing one loaded base. `what` names the choice in the error
    raised when no fine-tune beats the base on its own (first) set of windows."""
    from ..engine.calibration import draw_windows, load_texts
    from ..recipe.datasets import describe_spec
    from ..models.loading import load_causal_lm, load_tokenizer
    from ..engine.perplexity import window_nlls

    cal = ctx.recipe.calibration
    device = ctx.torch_device
    models = [m for m in ctx.recipe.models_of(merge) if m.dataset is not None]
    tokenizer = load_tokenizer(ctx.base.path)
    texts = {m.name: load_texts(m.dataset, ctx.recipe.root, tokenizer) for m in models}
    windows = [{m.name: draw_windows(texts[m.name], tokenizer, min(count, cal.samples), cal, cal.seed + 1 + k,
                                     f"calibration part of dataset {describe_spec(m.dataset)} ({m.name})")
                for m in models} for k, count in enumerate(samples)]
    own = [{} for _ in windows]
    for m in models:
        specialist = load_causal_lm(ctx.source(m.model), ctx.base.path).to(device)
        for found, drawn in zip(own, windows):
            found[m.name] = window_nlls(specialist, drawn[m.name], cal.batch_size, device)
        del specialist
    model = load_causal_lm(ctx.base, ctx.base.path).to(device)
    base = [{n: window_nlls(model, w, cal.batch_size, device) for n, w in drawn.items()} for drawn in windows]
    domains = [n for n in windows[0] if mean_nll(own[0][n]) < mean_nll(base[0][n])]
    if not domains:
        from ..errors import MergeCliError

        raise MergeCliError(f"merge {merge.name}: {what} needs a fine-tune that beats the base on its own "
                            "calibration text, and none does", "set lambda to a number")
    return [Scoring({n: w[n] for n in domains}, {n: b[n] for n in domains}, {n: o[n] for n in domains}, model,
                    cal.batch_size, device) for w, b, o in zip(windows, base, own)]


def placed(merge: "MergeSpec", what: str, names: Iterable[str], model: Any) -> dict[str, Any]:
    """The model's own tensors of these names (one the loaded model does not have cannot be
    scored)."""
    state = model.state_dict()
    names = list(names)
    unknown = [name for name in names if name not in state]
    if unknown:
        from ..errors import MergeCliError

        raise MergeCliError(f"merge {merge.name}: {what} cannot place tensor {unknown[0]} of the checkpoint in "
                            "the loaded model", "set lambda to a number")
    return {name: state[name] for name in names}


def choose_lambda(ctx: "Context", merge: "MergeSpec", vectors: list, hessians: list["HessianSet"] | None,
                  workers: int) -> Search:
    """The lambda whose merge keeps the most of the fine-tunes' gain on their calibration windows."""
    import time

    import torch

    start = time.perf_counter()
    cal = ctx.recipe.calibration
    score_on, = scoring(ctx, merge, "lambda: auto")
    delta = merged_delta(ctx, with_param(merge, "lambda", 1.0), vectors, hessians, workers)
    state = placed(merge, "lambda: auto", delta, score_on.model)
    origin = {name: t.detach().clone() for name, t in state.items()}
    label = f"lambda search {merge.name}"

    def score(lam: float) -> float:
        with torch.no_grad():
            for name, d in delta.items():
                state[name].copy_(origin[name]).add_(d, alpha=lam)
        value = score_on.gain()
        ctx.reporter.log(f"{label}: lambda {lam:.3f} keeps {100 * value:.1f}% of the gain on calibration windows")
        return value

    with ctx.reporter.track(label, EVALUATIONS) as advance:
        def tracked(lam: float) -> float:
            value = score(lam)
            advance(1)
            return value
        chosen, best, seen = golden_max(tracked, *BRACKET, tol=TOLERANCE, max_evals=EVALUATIONS)
    return Search("lambda", chosen, best, {f"{k:.4f}": v for k, v in sorted(seen.items())}, score_on.domains,
                  score_on.count, cal.seq_len, round(time.perf_counter() - start, 3))


def merged_delta(ctx: "Context", merge: "MergeSpec", vectors: list, hessians: list["HessianSet"] | None,
                 workers: int, scales: Any = None) -> dict[str, Any]:
    """theta(1) - theta_base of every merged tensor, fp32, by the engine that writes the merge
    (under the model's own names, `Architecture.canonical`: a tied pair once, a legacy
    checkpoint's names with their prefix); `scales` as `merging.VariantPlan`'s."""
    import torch

    from ..engine.hessians import HessianReader
    from ..engine.writer import VariantPlan, merged_tensors, output_infos
    from ..methods.settings import settings_of
    from ..models.safetensors_io import Checkpoint

    device = ctx.torch_device
    plan = VariantPlan(settings_of(merge, ctx.recipe.models_of(merge)), vectors,
                       [HessianReader(h.artifact.path, merge.params.get("damp", 0.01), device) for h in hessians]
                       if hessians else None, torch.float32, merge.overflow == "clamp", "base", 1 << 62, scales)
    delta = {}
    with Checkpoint.open(ctx.base.path) as ckpt:
        infos = output_infos(plan, ckpt, ctx.arch, {})
        for info, (tensor, *_), first in merged_tensors(plan, ckpt, infos, ctx.arch, device, workers,
                                                         f"lambda search {merge.name}"):
            if first and info.dtype.is_floating_point:
                theta = ckpt.get(info.name).to(device, torch.float32)
                if not torch.equal(tensor.to(device), theta):
                    delta[ctx.arch.canonical(info.name)] = tensor.to(device).sub_(theta)
    return delta
