"""eval stage: perplexity of the base, every fine-tune and every merge on every recipe dataset.

Perplexity = exp(token-weighted mean NLL over non-pad next-token positions) on a fixed, seeded set
of packed windows from each dataset's held-out part, identical for every model (tokenized with the
base's tokenizer). Each (model, dataset) result is an artifact whose spec holds the model's
identity (its fingerprint; for a merge, the merge's key: the folder is verified against its stamp
before it is evaluated), the tokenizer's, the dataset's fingerprint and the window settings.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..store.artifacts import ArtifactSpec, DataFingerprint
from ..errors import MergeCliError
from ..quality.gain import mean_nll
from ..quality.report import Evaluated
from ..recipe.schema import DatasetSpec, key_view
from ..store.coordinate import claim
from . import merge
from .base import Context, Stage, View
from .hessian import check_context
from ..recipe.datasets import describe_spec, fingerprint
from ..models.reference import resolve_model, tokenizer_folder
from ..quality.lmeval import run_tasks

if TYPE_CHECKING:
    import torch

    from ..engine.calibration import Windows
    from ..models.reference import ModelSource


class EvalSpec(ArtifactSpec):
    kind = "eval"
    format = 4  # 4: each window's document
    model: str
    tokenizer: str
    dataset: DataFingerprint
    evaluation: dict[str, Any]


class HarnessSpec(ArtifactSpec):
    kind = "lmeval"
    format = 3
    model: str
    base: str
    harness: dict[str, Any]
    task_files: tuple[tuple[str, int, int], ...] | None


@dataclass(frozen=True)
class Candidate:
    """A model to evaluate: its name, role, files and identity in cache keys."""

    name: str
    role: str  # base | finetune | merge
    source: "ModelSource"
    identity: str
    merge: dict | None = None


def eval_spec(ctx: Context, identity: str, dataset: DatasetSpec) -> EvalSpec:

    return EvalSpec(model=identity, tokenizer=ctx.base.fingerprint, dataset=fingerprint(dataset, ctx.recipe.root),
                    evaluation=key_view(ctx.recipe.evaluation, exclude={"datasets", "lm_eval"}))


def harness_spec(ctx: Context, identity: str) -> HarnessSpec:
    spec = ctx.recipe.evaluation.lm_eval
    assert spec is not None
    include = (ctx.recipe.root / spec.include_path) if spec.include_path else None
    files = tuple(sorted((str(p.relative_to(include)), p.stat().st_size, p.stat().st_mtime_ns)
                         for p in include.rglob("*") if p.is_file())) if include and include.is_dir() else None
    return HarnessSpec(model=identity, base=ctx.base.fingerprint, harness=key_view(spec), task_files=files)


def identities(ctx: Context) -> list[str]:
    """Cache identities of every model this recipe evaluates (merges by their key)."""
    return [ctx.base.fingerprint, *(ctx.source(m.model).fingerprint for m in ctx.recipe.models),
            *(f"merge:{merge.spec_of(ctx, merge.variant_of(ctx.recipe, m)).key()}" for m in ctx.recipe.merges)]


def plan(ctx: Context) -> list[ArtifactSpec]:
    specs: list[ArtifactSpec] = []
    for identity in identities(ctx):
        specs += [eval_spec(ctx, identity, d) for d in ctx.recipe.eval_datasets().values()]
        if ctx.recipe.evaluation.lm_eval:
            specs.append(harness_spec(ctx, identity))
    return specs


def candidates(ctx: Context) -> list[Candidate]:

    merges = ctx.need(merge.STAGE) if ctx.recipe.merges else []
    found = [Candidate("base", "base", ctx.base, ctx.base.fingerprint)]
    found += [Candidate(m.name, "finetune", ctx.source(m.model), ctx.source(m.model).fingerprint)
              for m in ctx.recipe.models]
    found += [Candidate(r.name, "merge", resolve_model(str(r.path), ctx.recipe.root), f"merge:{r.key}", r.as_dict())
              for r in merges]
    return found


def run(ctx: Context) -> list[Evaluated]:
    """Perplexity of base, fine-tunes and merges (merges are built first if missing)."""
    datasets = ctx.recipe.eval_datasets()
    if not datasets:
        raise MergeCliError("nothing to evaluate on: no fine-tune has a dataset",
                            "add models.N.dataset or evaluation.datasets")
    ctx.torch_device  # fail on a bad --device before any work
    check_context(ctx, ctx.recipe.evaluation.seq_len, "evaluation.seq_len")
    found = candidates(ctx)
    scores, per_window, documents = _evaluate(ctx, found, _windows(ctx, datasets))
    return [Evaluated(c.name, c.role, {d: math.exp(mean_nll(w))
                                       for d, w in per_window[c.name].items()},
                      c.merge, scores.get(c.name, {}), per_window[c.name], documents) for c in found]


def _evaluate(ctx: Context, found: list[Candidate], windows: dict[str, tuple[DatasetSpec, Callable[[], "Windows"]]]
              ) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, list[tuple[float, int]]]],
                         dict[str, list[int]]]:
    """Every (model, dataset) perplexity and lm-eval score, cached ones reused. The missing ones
    are jobs, in model order; under torchrun each process takes a contiguous run of them (so it
    loads few models), and rank 0 records every result. Returns (scores, per-window NLLs, the
    document each dataset's windows start in)."""
    harness = ctx.recipe.evaluation.lm_eval is not None
    jobs = [(c, d) for c in found for d in ([None] if harness else []) + list(windows)]  # d None: lm-eval
    specs = [harness_spec(ctx, c.identity) if d is None else eval_spec(ctx, c.identity, windows[d][0])
             for c, d in jobs]
    labels = [f"lm-eval {c.name}" if d is None else f"eval {c.name} on {d}" for c, d in jobs]
    loaded: dict[str, torch.nn.Module] = {}  # the model of the current job only

    def produce(candidate: Candidate, dataset: str | None, folder: Path) -> None:
        from ..models.loading import load_causal_lm  # start-up time (torch)
        from ..engine.perplexity import window_nlls

        if candidate.name not in loaded:
            loaded.clear()  # one model in memory at a time
        if dataset is None:
            return _harness(ctx, candidate, folder)
        if candidate.name not in loaded:
            loaded[candidate.name] = load_causal_lm(candidate.source, ctx.base.path).to(ctx.torch_device)
        start = time.perf_counter()
        drawn = windows[dataset][1]()
        per_window = window_nlls(loaded[candidate.name], drawn, ctx.recipe.evaluation.batch_size, ctx.torch_device)
        if not all(math.isfinite(s) for s, _ in per_window):
            raise MergeCliError(f"{candidate.name} gives a non-finite loss on {dataset}; its weights are "
                                "broken (NaN/Inf activations)", "check the model, or the merge's parameters")
        (folder / "eval.json").write_text(json.dumps({"windows": per_window, "documents": drawn.documents}))
        ctx.reporter.log(f"eval [bold]{candidate.name}[/] on {dataset}: perplexity "
                         f"{math.exp(mean_nll(per_window)):.4g} ({time.perf_counter() - start:.0f} s)")

    with claim(ctx.workspace, ctx.dist, specs, labels) as step:
        missing = step.missing
        if missing:
            with ctx.reporter.track("evaluation", len(missing)) as advance:
                for index in (missing[i] for i in ctx.dist.share(len(missing))):
                    step.build(index, partial(produce, *jobs[index]))
                    advance(1)
        built = step.settle()
    scores: dict[str, dict[str, float]] = {}
    per_window: dict[str, dict[str, list[tuple[float, int]]]] = {c.name: {} for c in found}
    documents: dict[str, list[int]] = {}
    for (candidate, dataset), (artifact, _) in zip(jobs, built):
        if dataset is None:
            scores[candidate.name] = json.loads((artifact.path / "scores.json").read_text())
        else:
            stored = json.loads((artifact.path / "eval.json").read_text())
            per_window[candidate.name][dataset] = [tuple(w) for w in stored["windows"]]
            documents[dataset] = stored["documents"]  # the same windows for every model
    return scores, per_window, documents


def _harness(ctx: Context, candidate: Candidate, folder: Path) -> None:
    """lm-evaluation-harness scores of one model."""

    source = candidate.source
    scores = run_tasks(source.path, ctx.recipe.evaluation.lm_eval, ctx.recipe.root, ctx.device,
                       tokenizer=tokenizer_folder(source.path, ctx.base.path),
                       base=ctx.base.path if source.kind == "lora" else None)
    (folder / "scores.json").write_text(json.dumps(scores))


def _windows(ctx: Context, datasets: dict[str, DatasetSpec]) -> dict[str, tuple[DatasetSpec, Callable[[], "Windows"]]]:
    """Per dataset: its spec and a loader of its windows, tokenized only when a result is actually
    missing (a fully cached eval reads no text)."""
    ev = ctx.recipe.evaluation

    def loader(name: str, spec: DatasetSpec) -> Callable[[], "Windows"]:
        @cache
        def load() -> "Windows":
            from ..engine.calibration import make_windows  # start-up time (torch)

            return make_windows(ctx.texts(spec, "eval"), ctx.tokenizer, ev.samples, ev.seq_len, ev.seed, pack=True,
                                what=f"held-out part of dataset {describe_spec(spec)} ({name})")
        return load

    return {name: (spec, loader(name, spec)) for name, spec in datasets.items()}


def show(results: list[Evaluated]) -> View:
    datasets = list(results[0].perplexity)
    rows = [[r.model, r.role, *(f"{r.perplexity[d]:.3f}" for d in datasets), f"{r.mean:.3f}"] for r in results]
    data = [{"model": r.model, "role": r.role, "perplexity": r.perplexity, "mean": r.mean, "windows": r.windows,
             "documents": r.documents} for r in results]
    return View("perplexity (lower is better)", ["model", "role", *datasets, "mean"], rows, data)


STAGE = Stage("eval", "Perplexity of the base, every fine-tune and every merge on every dataset of the recipe.",
              run=run, show=show, order=40, plan=plan)
