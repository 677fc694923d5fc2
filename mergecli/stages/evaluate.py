"""eval stage: perplexity of the base, every fine-tune and every merge on every recipe dataset.

Perplexity = exp(token-weighted mean NLL over non-pad next-token positions) on a fixed, seeded set
of packed windows from each dataset's held-out part, identical for every model (the windows are
tokenized with the base's tokenizer). Each (model, dataset, window settings) result is cached in
the workspace.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import cache
from typing import Callable
from pathlib import Path

import torch

from ..calibration import Windows, describe_spec, load_texts, make_windows
from ..errors import MergeCliError
from ..models.reference import ModelSource, resolve_model, tokenizer_folder
from ..progress import SILENT, Reporter
from ..recipe import Recipe
from .common import Context, check_device, open_context
from .hessian import load_model
from .merge import run_merge


@dataclass(frozen=True)
class Evaluated:
    model: str
    role: str  # base | finetune | merge
    perplexity: dict[str, float]
    merge: dict | None = None
    scores: dict[str, float] = field(default_factory=dict)  # lm-evaluation-harness "task:metric"

    @property
    def mean(self) -> float:
        values = list(self.perplexity.values())
        return sum(values) / len(values) if values else float("nan")


def nll_sum(model: torch.nn.Module, windows: Windows, batch_size: int, device: torch.device) -> tuple[float, int]:
    """(sum of next-token NLL, number of predicted tokens) over non-pad positions."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, mask in windows.batches(batch_size):
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
            target = ids[:, 1:]
            valid = (mask[:, 1:] * mask[:, :-1]).bool()
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                    target.reshape(-1), reduction="none").reshape(target.shape)
            total += float(nll[valid].double().sum())
            count += int(valid.sum())
    return total, count


def run_eval(recipe: Recipe, reporter: Reporter = SILENT, wait: bool = True, device: str = "cpu",
             ctx: Context | None = None) -> list[Evaluated]:
    """Perplexity of base, fine-tunes and merges (merges are built first if missing)."""
    datasets = recipe.eval_datasets()
    if not datasets:
        raise MergeCliError("nothing to evaluate on: no fine-tune has a dataset",
                            "add models.N.dataset or evaluation.datasets")
    dev = check_device(device)
    ctx = ctx or open_context(recipe, reporter, wait)
    merges = run_merge(recipe, device=device, reporter=reporter, wait=wait, ctx=ctx) if recipe.merges else []
    windows = _windows(ctx, datasets)
    candidates: list[tuple[str, str, ModelSource, dict | None]] = [("base", "base", ctx.base, None)]
    candidates += [(m.name, "finetune", ctx.source(m.model), None) for m in recipe.models]
    candidates += [(r.name, "merge", resolve_model(str(r.path), recipe.root), r.as_dict()) for r in merges]
    results = []
    for name, role, source, merge in candidates:
        scores = _harness(ctx, name, source, device) if recipe.evaluation.lm_eval else {}
        results.append(Evaluated(name, role, _perplexities(ctx, name, source, windows, dev), merge, scores))
    return results


def _harness(ctx: Context, name: str, source: ModelSource, device: str) -> dict[str, float]:
    """lm-evaluation-harness scores of one model, cached like perplexities."""
    from ..lmeval import run_tasks

    spec = ctx.recipe.evaluation.lm_eval
    include = (ctx.recipe.root / spec.include_path) if spec.include_path else None
    tasks_state = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in include.rglob("*")
                         if p.is_file()) if include and include.is_dir() else None
    inputs = {"model": source.fingerprint, "base": ctx.base.fingerprint, "spec": spec.model_dump(),
              "task_files": tasks_state}

    def produce(folder: Path) -> None:
        with ctx.reporter.track(f"lm-eval {name}", 1) as advance:
            scores = run_tasks(source.path, spec, ctx.recipe.root, device,
                               tokenizer=tokenizer_folder(source.path, ctx.base.path),
                               base=ctx.base.path if source.kind == "lora" else None)
            advance(1)
        (folder / "scores.json").write_text(json.dumps(scores))

    artifact, _ = ctx.workspace.get_or_build("lmeval", inputs, f"lm-eval {name}", produce)
    return json.loads((artifact.path / "scores.json").read_text())


def window_inputs(recipe: Recipe, spec, base: ModelSource) -> dict:
    ev = recipe.evaluation
    return {"dataset": spec.model_dump(), "samples": ev.samples, "seq_len": ev.seq_len, "seed": ev.seed,
            "tokenizer": base.fingerprint}


def eval_inputs(source: ModelSource, base: ModelSource, windows: dict) -> dict:
    """What one perplexity result's cache key depends on."""
    return {"model": source.fingerprint, "base": base.fingerprint, **windows}


def used_artifacts(recipe: Recipe) -> set[str]:
    """Keys of every workspace artifact this recipe's stages would reuse (for `ws gc`)."""
    from ..workspace import artifact_key
    from .hessian import hessian_inputs
    from .taskvec import taskvec_inputs

    base = resolve_model(recipe.base, recipe.root)
    sources = {m.name: resolve_model(m.model, recipe.root) for m in recipe.models}
    keys = {artifact_key("taskvec", taskvec_inputs(base, s)) for s in sources.values()}
    keys |= {artifact_key("hessian", hessian_inputs(recipe, m, base, sources[m.name]))
             for m in recipe.models if m.dataset is not None}
    evaluated = [base, *sources.values()]
    evaluated += [resolve_model(str(recipe.output_path / m.name), recipe.root) for m in recipe.merges
                  if (recipe.output_path / m.name / "config.json").is_file()]
    for spec in recipe.eval_datasets().values():
        windows = window_inputs(recipe, spec, base)
        keys |= {artifact_key("eval", eval_inputs(source, base, windows)) for source in evaluated}
    return keys


def _windows(ctx: Context, datasets) -> dict[str, tuple[dict, Callable[[], Windows]]]:
    """Per dataset: the cache-key part and a loader of its windows, tokenized only when a result
    is actually missing (a fully cached eval reads no text)."""
    from transformers import AutoTokenizer

    ev = ctx.recipe.evaluation

    @cache
    def tokenizer():
        return AutoTokenizer.from_pretrained(ctx.base.path)

    def loader(name: str, spec) -> Callable[[], Windows]:
        @cache
        def load() -> Windows:
            texts = load_texts(spec, ctx.recipe.root, tokenizer(), part="eval")
            return make_windows(texts, tokenizer(), ev.samples, ev.seq_len, ev.seed, pack=True,
                                what=f"held-out part of dataset {describe_spec(spec)} ({name})")
        return load

    return {name: (window_inputs(ctx.recipe, spec, ctx.base), loader(name, spec)) for name, spec in datasets.items()}


def _perplexities(ctx: Context, name: str, source: ModelSource,
                  windows: dict[str, tuple[dict, Callable[[], Windows]]],
                  device: torch.device) -> dict[str, float]:
    ev = ctx.recipe.evaluation
    model = None
    result = {}
    for dataset, (key, win) in windows.items():
        inputs = eval_inputs(source, ctx.base, key)

        def produce(folder: Path) -> None:
            nonlocal model
            if model is None:
                model = load_model(ctx, source, use_base=source.fingerprint == ctx.base.fingerprint)[0].to(device)
            with ctx.reporter.track(f"perplexity {name} on {dataset}", 1) as advance:
                total, count = nll_sum(model, win(), ev.batch_size, device)
                advance(1)
            (folder / "eval.json").write_text(json.dumps({"nll_sum": total, "tokens": count}))

        artifact, _ = ctx.workspace.get_or_build("eval", inputs, f"eval {name} on {dataset}", produce)
        data = json.loads((artifact.path / "eval.json").read_text())
        result[dataset] = math.exp(data["nll_sum"] / data["tokens"])
    return result
