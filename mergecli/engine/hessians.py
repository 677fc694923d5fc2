"""Calibration statistics on disk: collecting a model's H = X^T X into an artifact, reading it back.

One artifact per fine-tune holds `hessian.safetensors` (one fp32 H sum per input group, and the
input embedding's token counts) and `hessian.json` (weight name -> group, token count per group,
the embedding's weight name). Sums are stored with their token count so they add up exactly;
consumers use G = H / n. That is also what lets several processes share one fine-tune's windows:
each collects the sums of its own part, and `combine` adds them.

The token counts are the embedding lookup's H: its input is a one-hot token, so H is the diagonal
of how often each token id is an input position (non-pad) of the windows. They come from the
windows alone (every process draws the same, so they are never reduced), cost one int64 per
vocabulary entry (SmolLM2: 0.4 MB beside 370 MB of H), and let RegMean merge the embedding rows
by the data instead of a plain mean.
"""

from __future__ import annotations

import json
import shutil
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..distributed import Group
from ..errors import MergeCliError
from ..methods.stats import LayerStats, TokenCounts
from ..models.architecture import Architecture
from ..models.loading import load_causal_lm, load_tokenizer
from ..models.reference import ModelSource
from ..models.safetensors_io import Checkpoint, StreamingWriter, TensorInfo
from ..progress import Reporter
from ..recipe.datasets import describe_spec
from ..recipe.schema import CalibrationSpec, DatasetSpec
from .calibration import Windows, draw_windows, load_texts
from .collect import (Statistics, collect, collect_blocks, find_block_groups, find_groups, in_features,
                      linear_modules)
from .hessian_set import FILENAME, META, read_meta
from .streamed import StreamedModel, Weights, source_weights


@dataclass
class Calibration:
    """A model ready to collect statistics on: its windows, its input groups and their widths, and
    how it runs: loaded whole (`model`), or block by block (`runner` with `weights`)."""

    name: str
    dataset: str
    windows: Windows
    groups: dict[str, list[str]]
    dims: dict[str, int]
    embedding: str  # the input embedding's weight name
    rows: int  # its vocabulary size
    model: torch.nn.Module | None = None
    runner: StreamedModel | None = None
    weights: Weights | None = None


def prepare(name: str, source: ModelSource, base: Path, arch: Architecture, dataset: DatasetSpec, root: Path,
            cal: CalibrationSpec, device: torch.device, workspace: Path, reporter: Reporter) -> Calibration:
    """Draw the model's calibration windows (identical in every process) and get the model ready:
    loaded, or (`calibration.layer_by_layer`) as a block-streamed runner over its files; refuse
    early if the workspace disk cannot hold the result."""
    tokenizer = load_tokenizer(source.path, base)
    texts = load_texts(dataset, root, tokenizer)
    windows = draw_windows(texts, tokenizer, cal.samples, cal, cal.seed,
                           what=f"dataset {describe_spec(dataset)} of {name}")
    use_base = cal.source == "base"
    if cal.layer_by_layer:
        runner = StreamedModel.from_folder(base if use_base or source.kind == "lora" else source.path, device=device)
        weights = source_weights(runner, source, base, arch, use_base)
        groups, dims = find_block_groups(runner, weights, windows.input_ids)
        model, loaded = runner.model, None
    else:
        runner = weights = None
        model = loaded = load_causal_lm(source, base, use_base=use_base)
        groups = find_groups(model, windows.input_ids)
        modules = linear_modules(model)
        dims = {leader: in_features(modules[leader]) for leader in groups}
    rows = model.get_input_embeddings().weight.shape[0]
    size = sum(d * d * 4 for d in dims.values()) + 8 * rows  # fp32 H per group, int64 token counts
    free = shutil.disk_usage(workspace).free
    reporter.log(f"hessians {name}: {len(groups)} input groups for {sum(map(len, groups.values()))} "
                 f"linear layers, {size / 2**20:.1f} MiB on disk; {windows.tokens} tokens"
                 + (", one block at a time" if runner else ""))
    if size > free:
        raise MergeCliError(f"hessians of {name} need {size / 2**30:.2f} GiB, the workspace disk has "
                            f"{free / 2**30:.2f} GiB free", "free space or point --workspace elsewhere")
    return Calibration(name, describe_spec(dataset), windows, groups, dims, embedding_weight(model), rows, loaded,
                       runner, weights)


def collect_windows(prepared: Calibration, rows: range, cal: CalibrationSpec, device: torch.device,
                    advance: Callable[[int], None], finished: Callable[[str, torch.Tensor], None] | None = None
                    ) -> Statistics:
    """The summed statistics of windows `rows` (a zero sum for a group no window reached). Block by
    block, `finished` gets each group's H as soon as its block is done (see `collect_blocks`)."""
    ids, mask = prepared.windows.input_ids, prepared.windows.attention_mask
    part = Windows(ids[rows.start:rows.stop], mask[rows.start:rows.stop])
    if prepared.runner is not None:
        stats = collect_blocks(prepared.runner, prepared.weights, part, prepared.groups, prepared.dims,
                               cal.batch_size, advance, finished)
    else:
        stats = collect(prepared.model, part, prepared.groups, cal.batch_size, device, advance)
    for leader, d in prepared.dims.items():
        if finished is None:
            stats.sums.setdefault(leader, torch.zeros(d, d))
        stats.counts.setdefault(leader, 0)
    return stats


def combine(stats: Statistics, group: Group) -> Statistics:
    """Every process's sums and token counts added up, on rank 0 (one group at a time, in fp64;
    counts exactly)."""
    leaders = list(stats.sums)
    counts = group.reduce_sum(torch.tensor([stats.counts[leader] for leader in leaders], dtype=torch.int64))
    sums = {leader: group.reduce_sum(stats.sums[leader]) for leader in leaders}
    return Statistics(sums, dict(zip(leaders, counts.tolist())), stats.members)


class _HessianFile:
    """The statistics artifact being written: one fp32 H sum per input group, in the groups' order,
    then the embedding's token counts (of all the windows) and what maps to what."""

    def __init__(self, folder: Path, prepared: Calibration) -> None:
        self.folder, self.prepared = folder, prepared
        self.counts = token_counts(prepared.windows, prepared.rows)
        infos = [TensorInfo(f"{leader}.H", (d, d), torch.float32) for leader, d in prepared.dims.items()]
        infos.append(TensorInfo(f"{prepared.embedding}.counts", tuple(self.counts.shape), torch.int64))
        self.writer = StreamingWriter(folder / FILENAME, infos, {"model": prepared.name})

    def put(self, leader: str, h: torch.Tensor) -> None:
        self.writer.write(f"{leader}.H", h.float())

    def close(self, stats: Statistics) -> None:
        prepared = self.prepared
        self.writer.write(f"{prepared.embedding}.counts", self.counts)
        self.writer.close()
        (self.folder / META).write_text(json.dumps({
            "model": prepared.name, "dataset": prepared.dataset, "tokens": prepared.windows.tokens,
            "members": stats.members, "counts": stats.counts, "groups": prepared.groups,
            "embedding": prepared.embedding}, indent=1))


def write_hessians(folder: Path, prepared: Calibration, stats: Statistics) -> None:
    """The statistics artifact of sums collected beforehand (every group's H in memory)."""
    file = _HessianFile(folder, prepared)
    for leader in prepared.dims:
        file.put(leader, stats.sums[leader])
    file.close(stats)


def collect_into(folder: Path, prepared: Calibration, cal: CalibrationSpec, device: torch.device,
                 advance: Callable[[int], None]) -> None:
    """Collect every window's statistics into the artifact at `folder`: block by block each
    group's H is written as soon as its block is done (one block's H in memory, whatever the
    depth); loaded whole, every H at the end."""
    file = _HessianFile(folder, prepared)
    rows = range(len(prepared.windows.input_ids))
    if prepared.runner is not None:
        stats = collect_windows(prepared, rows, cal, device, advance, finished=file.put)
    else:
        stats = collect_windows(prepared, rows, cal, device, advance)
        for leader in prepared.dims:
            file.put(leader, stats.sums[leader])
    file.close(stats)


def embedding_weight(model: torch.nn.Module) -> str:
    """The name of the input embedding's weight, as the checkpoint (and the merge) calls it."""
    weight = model.get_input_embeddings().weight
    return next(name for name, p in model.named_parameters() if p is weight)


def token_counts(windows: Windows, rows: int) -> torch.Tensor:
    """How often each token id is an input position of the windows (padding excluded), one int64
    per embedding row: the diagonal of the embedding lookup's H. Ids beyond `rows` (tokens the
    base's embedding does not have) are not counted."""
    ids = windows.input_ids[windows.attention_mask.bool()]
    return torch.bincount(ids[ids < rows], minlength=rows).to(torch.int64)


class HessianReader:
    """Per-tensor statistics for the merge: G = H / n of the tensor's input group, a few kept in
    memory; for the input embedding, its token frequencies (`TokenCounts`)."""

    def __init__(self, folder: Path, damp: float, device: torch.device = torch.device("cpu"), keep: int = 3) -> None:
        meta = read_meta(folder)
        self._members: dict[str, str] = meta["members"]
        self._counts: dict[str, int] = meta["counts"]
        self._ckpt = Checkpoint.open(folder)
        self._damp = damp
        self._device = device
        self._keep = keep
        self._cache: OrderedDict[str, LayerStats] = OrderedDict()
        self._lock = threading.Lock()  # the merge asks from several worker threads
        self._embedding: str = meta["embedding"]

    def stats(self, weight_name: str) -> LayerStats | TokenCounts | None:
        if weight_name == self._embedding:
            counts = self._ckpt.get(f"{weight_name}.counts").to(self._device, torch.float64)
            return TokenCounts(counts / max(float(counts.sum()), 1.0))
        group = self._members.get(weight_name)
        if group is None:
            return None
        with self._lock:
            if group not in self._cache:
                h = self._ckpt.get(f"{group}.H").to(self._device)
                self._cache[group] = LayerStats(h, self._damp, max(self._counts[group], 1))
                if len(self._cache) > self._keep:
                    self._cache.popitem(last=False)
            self._cache.move_to_end(group)
            return self._cache[group]
