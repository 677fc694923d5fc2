"""`lambda: auto`: a merge's scale chosen on held-out calibration windows, never on evaluation text.

Why: a merged task vector is rarely best at scale 1. Task arithmetic sums N task vectors (its best
scale on the quality benchmark is near 1/N, and at 1 it keeps far less of the gain), TIES averages
the agreeing ones, RegMean solves a least-squares problem per layer whose errors compound over
depth. theta(lambda) = theta_base + lambda * delta is one line through weight space, and the
merge's score along it -- the mean gain retained over the fine-tunes' domains (`gain.py`, the
metric `compare` reports) -- costs one forward pass over a few windows per domain per candidate:
the merged change at lambda 1 (`delta`) is computed once, by the same engine that writes the
merge, and stored in the workspace (the merge stage's parts).

Windows: `SAMPLES` per fine-tune, as `scoring.scoring_sets` draws them (seed `calibration.seed + 1`).
Search: golden section on `BRACKET` to `TOLERANCE`, both ends evaluated too, so a best scale at
the edge is seen (at most `EVALUATIONS` forward passes per domain).
Memory: the runner's, block by block (`engine.streamed`): the base's and the change's tensors of
one block at a time, beside the modules outside the stack.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

from ..engine.calibration import DRAW
from ..methods.coefficients import golden_max
from .scales import WRITTEN, Choice, Chooser, Setting
from .scoring import plus, scoring_sets

if TYPE_CHECKING:
    from ..engine.streamed import Weights

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


class AutoLambda(Chooser):
    """The lambda whose merge keeps the most of the fine-tunes' gain on their calibration windows."""

    mode = "auto"
    parts = "whole"

    def key(self, datasets: Callable[[], list[dict[str, Any]]], calibration: dict[str, Any],
            general: Callable[[], dict[str, Any] | None]) -> dict[str, Any]:
        return {"datasets": datasets(), "calibration": calibration, "samples": SAMPLES, "draw": DRAW,
                "bracket": list(BRACKET), "tolerance": TOLERANCE, "evaluations": EVALUATIONS, "written": WRITTEN}

    def choose(self, setting: Setting, parts: Sequence["Weights"]) -> Choice:
        start = time.perf_counter()
        score_on, = scoring_sets(setting.runner, setting.base, setting.domains, setting.tokenizer,
                                 setting.calibration, (SAMPLES,), setting.merge, "lambda: auto", setting.dist)
        delta, = parts
        label = f"lambda search {setting.merge}"

        def score(lam: float) -> float:
            value = score_on.gain(plus(setting.base, [delta], lambda name, i: lam))
            setting.reporter.log(f"{label}: lambda {lam:.3f} keeps {100 * value:.1f}% of the gain on calibration "
                                 "windows")
            return value

        with setting.reporter.track(label, EVALUATIONS) as advance:
            def tracked(lam: float) -> float:
                value = score(lam)
                advance(1)
                return value
            chosen, best, seen = golden_max(tracked, *BRACKET, tol=TOLERANCE, max_evals=EVALUATIONS)
        search = Search("lambda", chosen, best, {f"{k:.4f}": v for k, v in sorted(seen.items())}, score_on.domains,
                        score_on.count, setting.calibration.seq_len, round(time.perf_counter() - start, 3))
        return Choice(lam=chosen, record=search.as_dict())

    def log_line(self, record: dict[str, Any]) -> str:
        return (f"lambda {record['chosen']:.3f} chosen on calibration windows (keeps {100 * record['score']:.1f}% "
                "of the gain there)")

    def card_lines(self, record: dict[str, Any]) -> list[str]:
        trace = ", ".join(f"{float(k):g}: {100 * v:.1f}%" for k, v in record["trace"].items())
        return [f"lambda: auto chose {record['chosen']:.4g}: the scale whose merge keeps the most of the fine-tunes' "
                f"gain ({100 * record['score']:.1f}%) on {record['windows']} held-out calibration windows of "
                f"{record['seq_len']} tokens per fine-tune ({', '.join(record['domains'])}). Tried: {trace}."]
