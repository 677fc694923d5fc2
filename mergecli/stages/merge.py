"""merge stage: every variant of the recipe, streamed tensor by tensor into a Hugging Face folder.

For each output tensor: read the base tensor and each fine-tune's tensor as stored (or a LoRA's
task vector), apply the variant's method (pure math in `mergecli.methods`, a chunk of rows at a
time), append the result to the shard being written. Peak memory is the largest tensor times
(models + 2) in its stored dtype, plus one score buffer for top-k (fp32; fp64 for data-aware
scores), independent of depth. The folder is built under a temporary name and renamed into
place, so it appears complete or not at all; a `mergecli.json` stamp records the cache key, and
an identical rerun reuses it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import uuid
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import torch

from .. import __version__
from ..errors import MergeCliError
from ..methods import METHODS, NonFiniteTaskVector, TrimParams, merge_tensor
from ..models.architecture import Architecture
from ..models.safetensors_io import Checkpoint, ShardedWriter, TensorInfo
from ..progress import SILENT, Reporter
from ..recipe import MergeSpec, Recipe
from ..workspace import artifact_key, fsync_tree
from .common import Context, check_device, open_context, output_folder_is_ours
from .hessian import HessianReader, HessianSet, hessian_set
from .taskvec import TaskVector, task_vector

STAMP = "mergecli.json"
T = TypeVar("T")
WEIGHT_FILES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
NOT_COPIED = {"README.md", ".gitattributes", "model.safetensors.index.json", "pytorch_model.bin.index.json"}


@dataclass
class MergeResult:
    name: str
    method: str
    score: str | None
    density: float
    path: Path
    reused: bool
    seconds: float
    kept_density: float
    tensors: int
    models: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


def run_merge(recipe: Recipe, only: list[str] | None = None, overwrite: bool = False, device: str = "cpu",
              reporter: Reporter = SILENT, wait: bool = True, ctx: Context | None = None,
              workers: int = 2) -> list[MergeResult]:
    """Build every merge variant of the recipe (or those named in `only`); cached ones are reused.

    `workers` tensors are computed at once (threads, each with its share of torch's threads);
    the result does not depend on it."""
    if workers < 1:
        raise MergeCliError(f"workers must be at least 1, got {workers}")
    if not recipe.merges:
        raise MergeCliError("the recipe has no merges", "add a 'merges:' list (see `mergecli recipes ls`)")
    variants = [recipe.merge(name) for name in only] if only else recipe.merges
    dev = check_device(device)
    ctx = ctx or open_context(recipe, reporter, wait)
    vectors = {spec.name: task_vector(ctx, spec) for spec in recipe.models}
    hessians: dict[str, HessianSet] = {}
    results = []
    for merge in variants:
        models = recipe.models_of(merge)
        if merge.needs_stats:
            for spec in models:
                if spec.name not in hessians:
                    hessians[spec.name] = hessian_set(ctx, spec, dev)
        results.append(_merge_variant(ctx, merge, [vectors[m.name] for m in models],
                                      [hessians[m.name] for m in models] if merge.needs_stats else None,
                                      overwrite, dev, workers))
    return results


def _merge_variant(ctx: Context, merge: MergeSpec, vectors: list[TaskVector], hessians: list[HessianSet] | None,
                   overwrite: bool, device: torch.device, workers: int) -> MergeResult:
    recipe = ctx.recipe
    weights = [next(m.weight for m in recipe.models if m.name == v.model) for v in vectors]
    params = merge.model_dump(by_alias=True, exclude={"name", "models"})
    key = artifact_key("merge", {"base": ctx.base.fingerprint, "taskvecs": [v.artifact.key for v in vectors],
                                 "hessians": [h.artifact.key for h in hessians or []],
                                 "weights": weights, "params": params, "shard_bytes": recipe.shard_bytes})
    out = recipe.output_path / merge.name
    # one run at a time per output folder; under that lock, temp folders of killed runs are stale
    with ctx.workspace.lock(artifact_key("output", {"path": str(out)})):
        for stale in [*out.parent.glob(f".{merge.name}.*.tmp"), *out.parent.glob(f".{merge.name}.*.old")]:
            shutil.rmtree(stale, ignore_errors=True)
        stamp = _read_stamp(out)
        if stamp and stamp.get("key") == key and all((out / f).is_file() for f in stamp.get("files", [])):
            ctx.reporter.log(f"merge [bold]{merge.name}[/]: reused {out}")
            return MergeResult(**{**stamp["result"], "path": out, "reused": True})
        if not overwrite and not output_folder_is_ours(out, STAMP):
            raise MergeCliError(f"output folder {out} exists and was not written by mergecli",
                                "pass --overwrite to replace it, or change output_dir")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{merge.name}.{uuid.uuid4().hex[:8]}.tmp"
        tmp.mkdir()
        try:
            result = _write_variant(ctx, merge, vectors, hessians, weights, tmp, device, workers)
            result.path = out
            files = sorted(p.name for p in tmp.iterdir())
            (tmp / STAMP).write_text(json.dumps({"key": key, "files": files, "result": result.as_dict()}, indent=1))
            _write_card(tmp, recipe, merge, result)
            fsync_tree(tmp)
            _replace_folder(out, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    ctx.reporter.log(f"merge [bold]{merge.name}[/]: wrote {out} in {result.seconds:.1f} s")
    return result


def _write_variant(ctx: Context, merge: MergeSpec, vectors: list[TaskVector], hessians: list[HessianSet] | None,
                   weights: list[float], folder: Path, device: torch.device, workers: int) -> MergeResult:
    start = time.perf_counter()
    method = METHODS[merge.method]
    params = TrimParams(merge.score, merge.density or 1.0, merge.topk == "row", merge.seed, merge.compensate,
                        merge.alpha)
    readers = [HessianReader(h, merge.damp, device) for h in hessians] if hessians else None
    without_stats = 0
    out_dtype = getattr(torch, merge.dtype) if merge.dtype else None
    arch = ctx.arch
    kept = offered = 0
    with Checkpoint.open(ctx.base.path) as base:
        extra = _extra_rows(vectors) if ctx.recipe.extra_tokens == "union" else {}
        infos = [TensorInfo(n, _grown(i.shape, extra.get(arch.canonical(n))),
                            out_dtype if out_dtype and i.dtype.is_floating_point else i.dtype)
                 for n, i in ((n, base.info(n)) for n in base.names())]
        writer = ShardedWriter(folder, infos, ctx.recipe.shard_bytes)

        def merged(info: TensorInfo) -> tuple[torch.Tensor, int, int, bool]:
            """One output tensor, entries kept and offered, and whether some statistics were missing."""
            name, dtype = info.name, info.dtype
            canonical = arch.canonical(name)
            theta = base.get(name)
            k = n = 0
            missing = False
            if theta.dtype.is_floating_point and any(canonical in v for v in vectors):
                theta = theta.to(device)
                stats = [r.stats(canonical) for r in readers] if readers else None
                missing = bool(readers) and any(s is None for s in stats)
                sources = [v.tensor(canonical, theta) for v in vectors]
                sources = [None if t is None else t.to(device) for t in sources]
                try:
                    theta, k, n = merge_tensor(method, sources, weights, params, canonical,
                                               canonical in arch.transposed, stats, base=theta, lam=merge.lambda_,
                                               dtype=dtype)
                except NonFiniteTaskVector as exc:
                    raise MergeCliError(f"{vectors[exc.index].model}: tensor {canonical} has NaN/Inf entries in its "
                                        "task vector", "the checkpoint (or the base) is corrupt") from None
                theta = theta.cpu()
            if canonical in extra:
                index, rows = extra[canonical]
                theta = torch.cat([theta.to(dtype), vectors[index].extra(canonical).to(dtype)])
            return theta.to(dtype), k, n, missing

        threads = torch.get_num_threads()
        torch.set_num_threads(max(1, threads // workers))
        try:
            with ctx.reporter.track(f"merge {merge.name}", len(infos)) as advance:
                for info, (tensor, k, n, missing), first in _in_order(list(writer.order), arch.canonical, merged,
                                                                        workers):
                    if first:  # a tied pair is merged once: count it once
                        kept, offered, without_stats = kept + k, offered + n, without_stats + missing
                    writer.write(info.name, tensor)
                    advance(1)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        finally:
            torch.set_num_threads(threads)
    if without_stats:
        ctx.reporter.log(f"merge [bold]{merge.name}[/]: {without_stats} tensors have no calibration statistics "
                         f"(embeddings, norms, biases, lm_head) and used "
                         + ("a weighted mean" if method.needs_stats else "magnitude scores"))
    _copy_side_files(ctx.base.path, folder, merge.dtype)
    if extra:
        _adopt_vocabulary(folder, extra, [ctx.source(m.model).path for m in ctx.recipe.models
                                          if m.name in {v.model for v in vectors}], infos, arch)
    return MergeResult(merge.name, merge.method, merge.score, merge.density or 1.0, folder, False,
                       round(time.perf_counter() - start, 3), kept / offered if offered else 0.0,
                       len(infos), [v.model for v in vectors])


def _in_order(items: list[TensorInfo], key: Callable[[str], str], compute: Callable[[TensorInfo], T],
              workers: int) -> Iterator[tuple[TensorInfo, T, bool]]:
    """Yield (item, its result, first time for its key) in order, computing up to `workers` items
    ahead in threads: one tensor's single-threaded steps (reading, Python, kthvalue, random draws)
    overlap another's. Items sharing a key (a tied pair) are computed once. An item is started
    ahead only while the entries being computed stay within the largest tensor's, so peak memory
    is one largest-tensor working set whatever the order of the tensors (the embedding and the
    output layer are often neighbours)."""
    size = {key(i.name): math.prod(i.shape) for i in items}
    budget = max(size.values(), default=0)
    left = Counter(key(i.name) for i in items)
    futures: dict[str, Future] = {}
    yielded: set[str] = set()
    ahead = 0
    with ThreadPoolExecutor(workers) as pool:
        try:
            for position, item in enumerate(items):
                while ahead < len(items):
                    nxt_key = key(items[ahead].name)
                    if nxt_key not in futures:
                        running = sum(size[k] for k, f in futures.items() if not f.done())
                        if ahead > position and (len(futures) > workers or running + size[nxt_key] > budget):
                            break
                        futures[nxt_key] = pool.submit(compute, items[ahead])
                    ahead += 1
                item_key = key(item.name)
                result = futures[item_key].result()
                left[item_key] -= 1
                if left[item_key] == 0:
                    del futures[item_key]
                yield item, result, item_key not in yielded
                yielded.add(item_key)
        finally:
            for future in futures.values():
                future.cancel()


def _extra_rows(vectors: list[TaskVector]) -> dict[str, tuple[int, int]]:
    """canonical tensor -> (task vector index, rows) of the fine-tune that added the most tokens."""
    found: dict[str, tuple[int, int]] = {}
    for index, vector in enumerate(vectors):
        for canonical, rows in vector.extra_rows().items():
            if rows > found.get(canonical, (0, 0))[1]:
                found[canonical] = (index, rows)
    return found


def _grown(shape: tuple[int, ...], extra: tuple[int, int] | None) -> tuple[int, ...]:
    return shape if extra is None else (shape[0] + extra[1], *shape[1:])


def _adopt_vocabulary(folder: Path, extra: dict[str, tuple[int, int]], sources: list[Path],
                      infos: list[TensorInfo], arch: Architecture) -> None:
    """With `extra_tokens: union` the output vocabulary is the largest fine-tune's: its size goes
    into config.json and its tokenizer files replace the base's."""
    index = max(extra.values(), key=lambda e: e[1])[0]
    source = sources[index]
    vocab = next(i.shape[0] for i in infos if arch.canonical(i.name) in extra)
    for path in source.iterdir():
        if path.is_file() and ("token" in path.name or path.name in ("vocab.json", "merges.txt", "chat_template.jinja")):
            shutil.copy2(path, folder / path.name)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["vocab_size"] = vocab
    config_path.write_text(json.dumps(config, indent=2))


def _copy_side_files(base: Path, folder: Path, dtype: str | None) -> None:
    """Config, generation config, tokenizer files: everything of the base that is not weights."""
    for path in base.iterdir():
        if path.is_file() and path.suffix not in WEIGHT_FILES and path.name not in NOT_COPIED:
            shutil.copy2(path, folder / path.name)
    config_path = folder / "config.json"
    if dtype and config_path.is_file():
        config = json.loads(config_path.read_text())
        config["dtype"] = dtype
        config.pop("torch_dtype", None)
        config_path.write_text(json.dumps(config, indent=2))


def _write_card(folder: Path, recipe: Recipe, merge: MergeSpec, result: MergeResult) -> None:
    (folder / "mergecli_recipe.yaml").write_text(recipe.to_yaml())
    rows = "\n".join(f"| {m.name} | `{m.model}` | {m.weight} |" for m in recipe.models_of(merge))
    (folder / "README.md").write_text(f"""---
library_name: transformers
tags: [merge, mergecli]
---
# {recipe.name}: {merge.name}

Merged with [mergecli](https://pypi.org/project/mergecli/) {__version__}: method `{merge.method}`,
score `{merge.score or '-'}`, density {merge.density}, lambda {merge.lambda_}, seed {merge.seed},
top-k per {merge.topk}.

Base model: `{recipe.base}`

| fine-tune | source | weight |
|---|---|---|
{rows}

Fraction of task-vector entries kept: {result.kept_density:.4f}. Merge time: {result.seconds:.1f} s.
The exact recipe is in `mergecli_recipe.yaml`.
""")


def _read_stamp(folder: Path) -> dict | None:
    try:
        return json.loads((folder / STAMP).read_text())
    except (OSError, ValueError):
        return None


def _replace_folder(out: Path, tmp: Path) -> None:
    """Swap the finished temp folder in; an old version is moved aside first, then deleted."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.old"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
