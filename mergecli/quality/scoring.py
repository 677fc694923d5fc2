"""What a merge's scales are chosen on: each fine-tune's held-out calibration windows, and the base's
and the fine-tune's own NLL on them (the two ends of the gain retained, `gain.py`).

Everything runs block by block (`engine.streamed`): a candidate merge is a weights callback (the
base plus scaled parts, assembled per block), never a loaded model, so scoring a 7B merge needs one
block's weights in memory, not the model's.

Windows: per fine-tune, `calibration.samples` at most, drawn from its calibration part as the
hessian stage draws them (`calibration.draw_windows`: one per document), with seed
`calibration.seed + 1` for the first set, `+ 2` for the second (other windows than the hessian
stage's; the held-out part the eval stage reads is never touched). A fine-tune that does not beat
the base on its own first set is left out of the score (as in compare).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from ..distributed import SINGLE, Group
from ..engine.calibration import Windows, draw_windows
from ..engine.streamed import StreamedModel, Weights
from ..errors import MergeCliError
from ..methods.combine import scaled_sum
from ..recipe.schema import CalibrationSpec
from .gain import mean_gain, mean_nll

NLLs = list[tuple[float, int]]  # per window: (NLL sum, predicted tokens)


def plus(base: Weights, parts: Sequence[Weights], factor: Callable[[str, int], float | None]) -> Weights:
    """The weights base + sum_i factor(name, i) * part_i, in fp32, tensor by tensor as the runner
    asks for them: a merge at other scales, assembled one block at a time (a part that lacks a
    tensor, or a factor of None or 0, adds nothing to it)."""
    def weights(names: list[str]) -> dict[str, torch.Tensor]:
        read = [part(names) for part in parts]
        return {name: scaled_sum(tensor, [(r.get(name), factor(name, i) if name in r else None)
                                          for i, r in enumerate(read)])
                for name, tensor in base(names).items()}
    return weights


@dataclass(frozen=True)
class Domain:
    """A fine-tune as scoring sees it: its weights (block by block) and its calibration text."""

    name: str
    weights: Weights
    texts: list[str]
    what: str  # the text, in words, for errors


def shared_nlls(runner: StreamedModel, weights: Weights, windows: Windows, batch_size: int,
                group: Group = SINGLE) -> NLLs:
    """`runner.window_nlls` with the windows shared out over the processes of a torchrun job (each
    its contiguous part), every process getting all of them back in order."""
    if not group.launched:
        return runner.window_nlls(weights, windows, batch_size)
    part = group.share(len(windows.input_ids))
    mine = runner.window_nlls(weights, Windows(windows.input_ids[part.start:part.stop],
                                                windows.attention_mask[part.start:part.stop]), batch_size)
    return [w for found in group.gather(mine) for w in found]


@dataclass
class Scoring:
    """One set of windows per domain, with the references of the gain."""

    windows: dict[str, Windows]
    reference: dict[str, NLLs]  # the base, per domain
    own: dict[str, NLLs]  # each fine-tune on its own domain
    runner: StreamedModel
    batch_size: int
    group: Group = SINGLE

    @property
    def domains(self) -> list[str]:
        return list(self.reference)

    def losses(self, weights: Weights) -> dict[str, NLLs]:
        return {d: shared_nlls(self.runner, weights, self.windows[d], self.batch_size, self.group)
                for d in self.domains}

    def gain(self, weights: Weights) -> float:
        """Mean gain retained by the merge these weights assemble."""
        return mean_gain(self.reference, self.own, self.losses(weights))

    @property
    def count(self) -> int:
        """Windows per domain (the fewest, should a fine-tune's text give fewer)."""
        return min(len(w.input_ids) for w in self.windows.values())

    def gap(self, domain: str) -> float:
        """What the fine-tune gains over the base on its domain's windows (mean NLL)."""
        return mean_nll(self.reference[domain]) - mean_nll(self.own[domain])

    def mean_gap(self) -> float:
        return sum(self.gap(d) for d in self.domains) / len(self.domains)


def scoring_sets(runner: StreamedModel, base: Weights, domains: Sequence[Domain], tokenizer: Any,
                 cal: CalibrationSpec, samples: Sequence[int], merge: str, what: str,
                 group: Group = SINGLE) -> list[Scoring]:
    """One differently seeded set of windows (seed `calibration.seed + 1`, `+ 2`, ...) per entry of
    `samples`, of that many windows per fine-tune (at most `calibration.samples`), with the base's
    and each fine-tune's NLLs on them. `what` names the choice in the error raised when no
    fine-tune beats the base on its own first set."""
    windows = [{d.name: draw_windows(d.texts, tokenizer, min(count, cal.samples), cal, cal.seed + 1 + k, d.what)
                for d in domains} for k, count in enumerate(samples)]
    own = [{d.name: shared_nlls(runner, d.weights, drawn[d.name], cal.batch_size, group) for d in domains}
           for drawn in windows]
    reference = [{name: shared_nlls(runner, base, w, cal.batch_size, group) for name, w in drawn.items()}
                 for drawn in windows]
    kept = [d.name for d in domains if mean_nll(own[0][d.name]) < mean_nll(reference[0][d.name])]
    if not kept:
        raise MergeCliError(f"merge {merge}: {what} needs a fine-tune that beats the base on its own calibration "
                            "text, and none does", "set lambda to a number")
    return [Scoring({n: w[n] for n in kept}, {n: r[n] for n in kept}, {n: o[n] for n in kept}, runner,
                    cal.batch_size, group) for w, r, o in zip(windows, reference, own)]
