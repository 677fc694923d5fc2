"""Writing one merge variant: every output tensor streamed into a Hugging Face folder.

For each output tensor: read the base tensor and each fine-tune's tensor as stored (or a LoRA's
task vector), apply the variant's method (the pure pipeline in `methods/pipeline.py`, a chunk of
rows at a time), append the result to the shard being written. Peak memory is the largest tensor
times (models + 2) in its stored dtype, plus one score buffer for top-k (fp32; fp64 for
data-aware scores), independent of depth.

Which tensors are written, and from which inputs, is the variant's layout (`layout.py`): the base's
tensors, or a layer-stacking variant's blocks (layers copied from one model, or merged from other
layers of the base and the models). With a merged vocabulary (`vocabulary.py`) the embedding and
output layer of every input are re-mapped to it by token first.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence, TypeVar

import torch

from ..distributed import SINGLE, Group
from ..errors import MergeCliError, RecipeError
from .hessians import HessianReader
from ..methods import schedule
from ..methods.pipeline import NonFiniteTaskVector, OutOfRange, TaskTensor, TensorPlan, fit, merge_parts, merge_tensor
from ..methods.settings import VariantSettings
from ..methods.table import Unbounded
from ..models.architecture import Architecture
from ..models.safetensors_io import Checkpoint, ShardedWriter, StreamingWriter, TensorInfo
from ..progress import Reporter
from ..recipe.schema import BASE
from .parts import StoredParts, part_folders, write_counts
from .layout import BASE as BASE_MODEL, Block, Layout, Output, stacked, whole
from .taskvectors import TaskVector, by_canonical
from .vocabulary import MergedTokenizer, Vocabulary

T = TypeVar("T")
CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json", "vocab.txt",
                   "merges.txt", "chat_template.jinja", "chat_template.json")


@dataclass
class VariantPlan:
    """Everything one variant's tensors are computed from."""

    settings: VariantSettings  # the method, its parameters and the models' weights, resolved per tensor
    vectors: list[TaskVector]
    readers: list[HessianReader] | None
    dtype: torch.dtype | None  # None: each tensor keeps the base's dtype
    clamp: bool
    extra_tokens: str
    shard_bytes: int
    # per tensor (canonical name), a factor for each model's part of the merge (`lambda: learned`,
    # `learn.py`); None: every part as the method gives it
    scales: Callable[[str], Sequence[float] | None] | None = None
    # a layer-stacking variant's blocks (`layout.stacked`); None: the base's tensors, each merged
    blocks: Sequence[Block] | None = None
    # the tokenizer written in place of the base's files, and the vocabulary the rows are re-mapped
    # to (`vocabulary.py`); None: the base's files and rows as they are
    tokenizer: MergedTokenizer | None = None
    names: Sequence[str] = ()  # per task vector, the model's name (a copied block's account names it)
    # several merges at once, one per entry (the `scales` of every tensor; None: the variant's own):
    # each output tensor is then a stack of them (`write_parts`)
    parts: Sequence[Sequence[float] | None] | None = None
    # the merge at a chosen scale, written from the parts it was scored on (`parts.py`): each tensor
    # they hold is the base plus the parts times their factors, not merged again; None: merged here
    from_parts: StoredParts | None = None


@dataclass
class Written:
    seconds: float
    kept: int
    offered: int
    tensors: int
    without_stats: int
    files: list[str] = field(default_factory=list)
    account: dict = field(default_factory=dict)  # what happened to every tensor (`account_of`)

    @property
    def kept_density(self) -> float:
        return self.kept / self.offered if self.offered else 0.0


MERGED = "merged"
BUFFER = "a buffer, not a weight"
INTEGER = "an integer tensor, equal in every fine-tune"
UNCHANGED = "no fine-tune changes it"
PASSED = "copied from "  # + the model: a layer-stacking variant's copied block (mergekit's passthrough)


@dataclass
class Tally:
    """What the tensors one process merged add up to: entries kept and offered (a tied pair counted
    once), tensors merged without statistics, and what happened to each output tensor."""

    kept: int = 0
    offered: int = 0
    without_stats: int = 0
    how: dict[str, str] = field(default_factory=dict)

    def written(self, seconds: float, tensors: int, files: list[str], vectors: Sequence[TaskVector],
                group: Group = SINGLE) -> Written:
        """The result of every process's tallies (collective under torchrun)."""
        kept, offered, without_stats = map(sum, zip(*group.gather((self.kept, self.offered, self.without_stats))))
        how = {name: what for part in group.gather(self.how) for name, what in part.items()}
        return Written(round(seconds, 3), kept, offered, tensors, without_stats, files, account_of(how, vectors))


def stream(plan: VariantPlan, ckpt: Checkpoint, infos: list[TensorInfo], arch: Architecture, device: torch.device,
           workers: int, label: str, tally: Tally, extra: dict[str, tuple[int, int]] | None = None
           ) -> Iterator[tuple[TensorInfo, torch.Tensor, bool]]:
    """The skeleton every writer of a merge shares: each output tensor of `infos` merged, in order,
    as (info, tensor, first time for its tied group), counted into `tally` on the way."""
    for info, (tensor, k, n, missing, what), first in merged_tensors(plan, ckpt, infos, arch, device, workers, label,
                                                                    extra):
        if first:  # a tied pair is merged once: count it once
            tally.kept, tally.offered = tally.kept + k, tally.offered + n
            tally.without_stats += missing
        tally.how[info.name] = what
        yield info, tensor, first


def write_variant(folder: Path, plan: VariantPlan, base: Path, arch: Architecture, sources: Sequence[Path],
                  device: torch.device, workers: int, reporter: Reporter, label: str, group: Group = SINGLE) -> Written:
    """Compute every tensor of the variant into `folder` (weights, config, tokenizer files).

    With several processes (`group`), each computes and writes the tensors it owns (balanced by
    bytes; a tied pair stays together); once all are done, rank 0 writes the other files."""
    start = time.perf_counter()
    tally = Tally()
    with Checkpoint.open(base) as ckpt:
        extra = _extra_rows(plan.vectors) if plan.extra_tokens == "union" else {}
        layout = layout_of(plan, ckpt, arch)
        infos = output_infos(plan, ckpt, arch, extra)
        key = {o.name: o.key for o in layout.outputs}
        sizes = {key[i.name]: i.nbytes for i in infos}  # a tied pair is computed once
        owner = dict(zip(sizes, group.balance(list(sizes.values()))))
        writer = ShardedWriter(folder, infos, plan.shard_bytes, owners=[owner[key[i.name]] for i in infos],
                               rank=group.rank)
        with writer, reporter.track(label, len(infos)) as advance:
            for info, tensor, _ in stream(plan, ckpt, list(writer.order), arch, device, workers, label, tally, extra):
                writer.write(info.name, tensor)
                advance(1)
    written = tally.written(time.perf_counter() - start, len(infos), writer.all_files, plan.vectors, group)
    if group.main:
        copy_side_files(base, folder, None if plan.dtype is None else str(plan.dtype).removeprefix("torch."),
                        tokenizer=plan.tokenizer is None)
        if plan.tokenizer is not None:
            plan.tokenizer.save(folder)
        if layout.depth is not None:
            set_depth(folder / "config.json", layout.depth, layout.origins)
        if extra:
            adopt_vocabulary(folder, extra, sources, infos, arch)
    return written


def layout_of(plan: VariantPlan, ckpt: Checkpoint, arch: Architecture) -> Layout:
    """What each output tensor of the variant is made from (`layout.py`)."""
    if plan.blocks is None:
        return whole(arch, ckpt.names(), plan.settings, len(plan.vectors))
    try:
        return stacked(arch, ckpt.names(), plan.blocks)
    except ValueError as exc:
        raise RecipeError(str(exc)) from None


def set_depth(config_path: Path, depth: int, origins: Sequence[int]) -> None:
    """A layer-stacking variant's config: its number of decoder layers (mergekit sets only that);
    a per-layer list of the base (`layer_types`) follows the layers it took them from."""
    config = json.loads(config_path.read_text())
    target = config.get("text_config", config) if isinstance(config.get("text_config"), dict) else config
    base_depth = None
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(target.get(key), int):
            base_depth, target[key] = target[key], depth
            break
    else:
        raise MergeCliError(f"{config_path.name}: no num_hidden_layers, n_layer or num_layers to set to {depth}")
    types = target.get("layer_types")
    if isinstance(types, list) and len(types) == base_depth:
        target["layer_types"] = [types[i] for i in origins]
    config_path.write_text(json.dumps(config, indent=2))


def write_parts(folder: Path, plan: VariantPlan, base: Path, arch: Architecture,
                parts: Sequence[Sequence[float] | None], device: torch.device, workers: int, reporter: Reporter,
                label: str) -> None:
    """The merges a scale is chosen over, as their change from the base, into `folder/part-<i>/`:
    the merge with `plan.scales` = `parts[i]` for every tensor (None: the variant's own), in fp32,
    under the base's stored names, every tensor some task vector has, each written as it is merged;
    `changed.json` lists those the part does change, and `counts.json` (`parts.py`) what the merge
    kept of each tensor. Read back block by block (`engine.streamed`),
    they are what `lambda: auto` and `lambda: learned` scale. All parts are made in one pass over
    the tensors (`VariantPlan.parts`): each tensor is read and trimmed once, and RegMean's Gram sum
    factored once, for every part; one tensor's parts are in memory at a time."""
    with Checkpoint.open(base) as ckpt:
        merged = {n for v in plan.vectors for n in v.names()}
        infos: dict[str, TensorInfo] = {}  # canonical name -> the first stored tensor of it (a tied pair once)
        for info in output_infos(plan, ckpt, arch, {}):
            if info.dtype.is_floating_point and arch.canonical(info.name) in merged:
                infos.setdefault(arch.canonical(info.name), TensorInfo(info.name, info.shape, torch.float32))
        every = replace(plan, dtype=torch.float32, extra_tokens="base", scales=None, parts=parts)
        changed: list[list[str]] = [[] for _ in parts]
        counts: dict[str, tuple[int, int, bool]] = {}
        folders = part_folders(folder, len(parts))
        with ExitStack() as stack:
            writers = []
            for index, part in enumerate(folders):
                part.mkdir()
                writers.append(stack.enter_context(StreamingWriter(
                    part / "model.safetensors", list(infos.values()), {"part": str(index)})))
            advance = stack.enter_context(reporter.track(f"{label}: {len(parts)} parts", len(infos)))
            for info, (tensor, kept, offered, missing, _), _ in merged_tensors(every, ckpt, list(infos.values()), arch,
                                                                               device, workers, label):
                counts[info.name] = (kept, offered, missing)
                base_tensor = ckpt.get(info.name).to(torch.float32)
                for index, writer in enumerate(writers):
                    delta = tensor[index] - base_tensor
                    if bool(delta.any()):
                        changed[index].append(info.name)
                    writer.write(info.name, delta)
                del tensor  # every part's copy of it, before the next tensor is merged
                advance(1)
        for part, names in zip(folders, changed):
            (part / "changed.json").write_text(json.dumps(names))
        write_counts(folder, counts)


def account_of(how: dict[str, str], vectors: Sequence[TaskVector]) -> dict:
    """What happened to every tensor of the inputs: how many output tensors were merged, which were
    copied from the base and why, which a layer-stacking variant copied from a model (by model:
    `passed_through`, absent when none), and which tensors of a fine-tune were not written (buffers
    the base lacks) or were lacked (buffers the base has)."""
    copied: dict[str, list[str]] = {}
    passed: dict[str, list[str]] = {}
    for name, what in sorted(how.items()):
        if what.startswith(PASSED):
            passed.setdefault(what.removeprefix(PASSED), []).append(name)
        elif what != MERGED:
            copied.setdefault(what, []).append(name)
    skipped = {v.model: v.buffers("skipped") for v in vectors if v.buffers("skipped")}
    lacking = {v.model: v.buffers("lacking") for v in vectors if v.buffers("lacking")}
    return {"merged": sum(what == MERGED for what in how.values()), "copied": copied,
            "skipped_buffers": skipped, "lacking_buffers": lacking,
            **({"passed_through": passed} if passed else {})}


def output_infos(plan: VariantPlan, ckpt: Checkpoint, arch: Architecture,
                 extra: dict[str, tuple[int, int]]) -> list[TensorInfo]:
    """Name, shape and dtype of every output tensor: the base's (or, for a layer-stacking variant,
    those of the base's layers each output layer stands for), grown by added tokens, in the
    variant's dtype."""
    vocabulary = plan.tokenizer.vocabulary if plan.tokenizer else None

    def shape(output: Output, info: TensorInfo) -> tuple[int, ...]:
        if vocabulary is not None and info.dtype.is_floating_point and is_vocabulary(arch, output.reference):
            return (vocabulary.size, *info.shape[1:])
        return _grown(info.shape, extra.get(output.key))

    return [TensorInfo(o.name, shape(o, i), plan.dtype if plan.dtype and i.dtype.is_floating_point else i.dtype)
            for o, i in ((o, ckpt.info(o.stored)) for o in layout_of(plan, ckpt, arch).outputs)]


def merged_tensors(plan: VariantPlan, ckpt: Checkpoint, infos: list[TensorInfo], arch: Architecture,
                   device: torch.device, workers: int, label: str, extra: dict[str, tuple[int, int]] | None = None
                   ) -> Iterator[tuple[TensorInfo, tuple[torch.Tensor, int, int, bool, str], bool]]:
    """Every output tensor of `infos`, in that order, `workers` at a time: (info, (tensor, entries
    kept, entries offered, whether some statistics were missing, merged or why it was copied from
    the base), first time for its tied group).
    Every parameter and weight is resolved for the tensor (name and layer) before it is merged."""
    vectors = plan.vectors
    extra = extra or {}
    layout = layout_of(plan, ckpt, arch)
    stored = by_canonical(ckpt, arch)
    vocabulary = plan.tokenizer.vocabulary if plan.tokenizer else None

    def merged(info: TensorInfo) -> tuple[torch.Tensor, int, int, bool, str]:
        out = layout.by_name[info.name]
        block = layout.blocks[out.block]
        canonical = out.reference
        theta = ckpt.get(out.stored)
        k = n = 0
        missing = False
        what = MERGED
        models = [vectors[i] for i in block.models]
        rows = None  # a vocabulary tensor's inputs re-mapped to the merged vocabulary
        if vocabulary is not None and theta.dtype.is_floating_point and is_vocabulary(arch, canonical):
            rows = _remapped(plan, vocabulary, block, canonical, out.key, theta)
        changed = rows is not None or any(name in v or name != canonical for v, name in zip(models, out.inputs))
        if block.copies:
            theta, what = _copied(plan, block, out, theta, info, arch.is_buffer(canonical), label, rows)
        elif theta.dtype.is_floating_point and changed and plan.from_parts is not None:
            k, n, missing = plan.from_parts.kept[canonical]
            theta = _fitted(plan.from_parts.merged(canonical, theta), info.dtype, plan.clamp, canonical, label)
        elif theta.dtype.is_floating_point and changed:
            readers = [plan.readers[i] for i in block.models] if plan.readers else None
            stats = [r.stats(arch.module_of(name)) for r, name in zip(readers, out.inputs)] if readers else None
            missing = bool(readers) and any(s is None for s in stats)
            if rows is not None:
                theta = rows[BASE].to(device)
                sources_ = [TaskTensor(rows[plan.names[i]], theta) for i in block.models]
            else:
                theta = theta.to(device)
                sources_ = [_task_tensor(v, name, theta, None if name == canonical else ckpt.get(stored[name]))
                            for v, name in zip(models, out.inputs)]
            sources_ = [None if t is None else t.to(device) for t in sources_]
            values = layout.resolve(out)
            try:
                tensor = TensorPlan(block.settings.method, values.weights, values.params, out.key,
                                    arch.is_transposed(canonical), arch.is_linear(canonical), values.model_params,
                                    plan.scales(canonical) if plan.scales else None, info.dtype, plan.clamp)
                theta, k, n = (merge_parts(tensor, plan.parts, sources_, stats, base=theta) if plan.parts
                               else merge_tensor(tensor, sources_, stats, base=theta))
            except NonFiniteTaskVector as exc:
                raise MergeCliError(f"{models[exc.index].model}: tensor {canonical} has NaN/Inf entries in its "
                                    "task vector", "the checkpoint (or the base) is corrupt") from None
            except OutOfRange as exc:
                raise out_of_range(exc, label) from None
            except Unbounded as exc:
                raise MergeCliError(f"{label}: tensor {canonical}: {exc}", "merge without this method, or with "
                                    "other models") from None
            theta = theta.cpu()
        elif theta.dtype.is_floating_point:  # copied from the base: still finite and representable
            theta = _fitted(theta, info.dtype, plan.clamp, canonical, label)
            what = BUFFER if arch.is_buffer(canonical) else UNCHANGED
        else:
            what = BUFFER if arch.is_buffer(canonical) else INTEGER
        if out.key in extra:
            index, _ = extra[out.key]
            theta = torch.cat([theta.to(info.dtype), vectors[index].extra(out.key).to(info.dtype)])
        if plan.parts and what != MERGED:  # the same in every merge
            theta = theta.expand(len(plan.parts), *theta.shape)
        return theta.to(info.dtype), k, n, missing, what

    def working_set(info: TensorInfo) -> int:
        """fp32 entries a tensor's merge holds: its result (one per part), each model's trimmed task
        vector, the base's rows and a temporary, and, where statistics are read, about three fp64
        fan-in x fan-in matrices (RegMean's Gram sum, one G~ and the solve's factor; OBS's damped H,
        factor and inverse). At 7B widths a down projection's are 2.9 GB, and an embedding's parts
        for three fine-tunes about 4 GB: two of either at once would be most of a 16 GB machine, so
        they run one at a time."""
        entries = math.prod(info.shape) * (len(plan.parts or [None]) + len(plan.vectors) + 2)
        canonical = layout.by_name[info.name].reference
        if plan.readers and len(info.shape) == 2 and arch.is_linear(canonical):
            fan_in = info.shape[0] if arch.is_transposed(canonical) else info.shape[1]
            entries += 6 * fan_in * fan_in
        return entries

    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // workers))
    try:
        yield from in_order(infos, lambda name: layout.by_name[name].key, merged, workers, working_set)
    finally:
        torch.set_num_threads(threads)


def _task_tensor(vector: TaskVector, name: str, reference: torch.Tensor,
                 own_base: torch.Tensor | None) -> TaskTensor | None:
    """A model's task vector for tensor `name` against the base's `reference` (`own_base`: the base's
    tensor `name`, when a layer-stacking merge sets it against another layer). A model without a
    task vector for `name` (a LoRA that leaves it alone) holds the base's own tensor there: against
    another layer of the base that is a change too."""
    found = vector.tensor(name, reference, own_base)
    if found is None and own_base is not None and own_base.dtype.is_floating_point:
        return TaskTensor(own_base, reference)
    return found


def is_vocabulary(arch: Architecture, name: str) -> bool:
    """A tensor whose rows are tokens: the input embedding or the output layer (mergekit's
    `vocabulary_axis: 0`)."""
    return arch.module_of(name) in arch.embeddings


def _remapped(plan: VariantPlan, vocabulary: Vocabulary, block: Block, canonical: str, name: str,
              theta: torch.Tensor) -> dict[str, torch.Tensor]:
    """A vocabulary tensor of every input of its block (the base and the merged models, or the
    copied model) re-mapped to the merged vocabulary (`vocabulary.py`); a model without a task
    vector for it (a LoRA) has the base's rows."""
    def own(index: int) -> torch.Tensor:
        found = plan.vectors[index].weights(canonical, theta)
        return theta if found is None else found

    if block.copies:
        key = BASE if block.source == BASE_MODEL else plan.names[block.source]
        inputs = {key: theta if block.source == BASE_MODEL else own(block.source)}
    else:
        inputs = {BASE: theta, **{plan.names[i]: own(i) for i in block.models}}
    return vocabulary.remap(inputs, name)


def _copied(plan: VariantPlan, block: Block, out: Output, theta: torch.Tensor, info: TensorInfo, buffer: bool,
            label: str, rows: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, str]:
    """A copied block's tensor (mergekit's passthrough): the model's own, as stored (re-mapped to
    the merged vocabulary: `rows`), times its `scale` where one is set for the tensor it reads.
    Where a model has no task vector (buffers, integer tensors, weights a LoRA leaves alone) its
    tensor is the base's."""
    model = BASE if block.source == BASE_MODEL else plan.names[block.source]
    if rows is not None:
        own = rows[model]
    else:
        own = None if block.source == BASE_MODEL else plan.vectors[block.source].weights(out.reference, theta)
        own = theta if own is None else own
    if not own.dtype.is_floating_point:
        return own, BUFFER if buffer else INTEGER
    if buffer:
        return _fitted(own, info.dtype, plan.clamp, out.name, label), BUFFER
    scale = schedule.resolve_first([block.scale], out.reference, out.layer, out.length)
    if scale is not None:
        own = own.to(torch.float32) * scale
    return _fitted(own, info.dtype, plan.clamp, out.name, label), PASSED + model


def out_of_range(exc: OutOfRange, label: str) -> MergeCliError:
    return MergeCliError(f"{label}: tensor {exc.tensor_name} would hold {exc.value:g}, which "
                         f"{str(exc.dtype).removeprefix('torch.')} cannot represent",
                         "lower lambda/weights, use dtype: float32 or bfloat16, or set overflow: clamp")


def _fitted(theta: torch.Tensor, dtype: torch.dtype, clamp: bool, name: str, label: str) -> torch.Tensor:
    try:
        return fit(theta.float(), dtype, clamp, name)
    except OutOfRange as exc:
        raise out_of_range(exc, label) from None


def in_order(items: list[TensorInfo], key: Callable[[str], str], compute: Callable[[TensorInfo], T],
             workers: int, cost: Callable[[TensorInfo], int] = lambda i: math.prod(i.shape)
             ) -> Iterator[tuple[TensorInfo, T, bool]]:
    """Yield (item, its result, first time for its key) in order, computing up to `workers` items
    ahead in threads: one tensor's single-threaded steps (reading, Python, kthvalue, random draws)
    overlap another's. Items sharing a key (a tied pair) are computed once. An item is started
    ahead only while the `cost` (memory, in fp32 entries) of the items being computed stays within
    the costliest item's, so peak memory is one largest working set whatever the order of the
    tensors (the embedding and the output layer are often neighbours)."""
    size = {key(i.name): cost(i) for i in items}
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


def adopt_vocabulary(folder: Path, extra: dict[str, tuple[int, int]], sources: Sequence[Path],
                     infos: list[TensorInfo], arch: Architecture) -> None:
    """With `extra_tokens: union` the output vocabulary is the largest fine-tune's: its size goes
    into config.json and its tokenizer files replace the base's."""
    index = max(extra.values(), key=lambda e: e[1])[0]
    vocab = next(i.shape[0] for i in infos if arch.canonical(i.name) in extra)
    for name in TOKENIZER_FILES:
        if (sources[index] / name).is_file():
            shutil.copy2(sources[index] / name, folder / name)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["vocab_size"] = vocab
    config_path.write_text(json.dumps(config, indent=2))


def copy_side_files(base: Path, folder: Path, dtype: str | None, tokenizer: bool = True) -> None:
    """The base's config, generation config and tokenizer files (named ones only: a base folder may
    hold anything else, which is not the merged model's; `tokenizer=False`: the merge writes a
    tokenizer of its own)."""
    for name in (*CONFIG_FILES, *(TOKENIZER_FILES if tokenizer else ())):
        if (base / name).is_file():
            shutil.copyfile(base / name, folder / name)
    config_path = folder / "config.json"
    if dtype and config_path.is_file():
        config = json.loads(config_path.read_text())
        config["dtype"] = dtype
        config.pop("torch_dtype", None)
        config_path.write_text(json.dumps(config, indent=2))
