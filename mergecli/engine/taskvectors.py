"""Task vectors tau = theta_ft - theta_base: checking a fine-tune against its base, and reading tau.

A full fine-tune's task vector is kept by reference: the artifact records which tensor of the
fine-tune pairs with which of the base (names, shapes and dtypes checked, tied aliases resolved,
rows of added tokens copied out), and the merge takes the difference a chunk at a time while it
reads both models. Writing an fp32 difference would cost twice the bytes of a bf16 fine-tune, to
be written once and read back by every merge, for nothing the two checkpoints do not already
hold. A LoRA adapter's task vector (`scale * B @ A`, computed without loading a model) is
materialized in fp32, one tensor at a time.

Only floating-point weights have task vectors. Integer tensors (buffers, quantization indices)
must be identical to the base's; a fine-tune storing a float weight as an integer type (a
quantized checkpoint) is refused, never differenced as if it were floats.

The checkpoints' stored names are the truth: every tensor of the fine-tune is paired with the
base's tensor of that name (legacy prefixes and tied aliases resolved by the architecture), never
filtered by the model class's parameter list, which transformers renames and fuses on load. A
fine-tune tensor the base lacks is refused, naming it and its file; buffers (tensors that are no
weights: old checkpoints' causal masks, rotary tables) are never merged: the base's are copied, a
fine-tune's are skipped, and the manifest lists them so the merge's account can say so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable

import torch

from ..errors import MergeCliError, ModelMismatchError
from ..methods.pipeline import TaskTensor
from ..models.architecture import Architecture
from ..models.lora import LoraAdapter
from ..models.reference import ModelSource
from ..models.safetensors_io import Checkpoint, StreamingWriter, TensorInfo
from ..progress import Reporter

FILENAME = "task_vector.safetensors"
MANIFEST = "taskvec.json"
EXTRA_ROWS = ".extra_rows"  # rows a fine-tune added beyond the base vocabulary (values, not deltas)


@dataclass(frozen=True)
class TaskVector:
    """One fine-tune's task vector: tensors by canonical name, read lazily."""

    model: str
    kind: str
    path: Path
    source: Path = field(compare=False)

    @cached_property
    def _manifest(self) -> dict:
        return json.loads((self.path / MANIFEST).read_text())

    @cached_property
    def _stored(self) -> Checkpoint | None:
        return Checkpoint.open(self.path) if (self.path / FILENAME).is_file() else None

    @cached_property
    def _finetune(self) -> Checkpoint:
        return Checkpoint.open(self.source)

    @property
    def by_reference(self) -> bool:
        return self._manifest.get("storage") == "reference"

    def names(self) -> list[str]:
        """Canonical names of the tensors this task vector has."""
        return list(self._manifest["tensors"])

    @property
    def tensors(self) -> int:
        return len(self._manifest["tensors"])

    def __contains__(self, canonical: str) -> bool:
        return canonical in self._manifest["tensors"]

    def tensor(self, canonical: str, base: torch.Tensor, own_base: torch.Tensor | None = None) -> TaskTensor | None:
        """This model's task vector for one tensor, given the base's tensor; None if it has none.

        A layer-stacking merge may set a model's tensor against another tensor of the base (layer
        5 of the model against layer 3 of the base): `base` is then that tensor and `own_base` the
        base's tensor of `canonical`, which a materialized task vector (a LoRA's) is relative to."""
        stored = self._manifest["tensors"].get(canonical)
        if stored is None:
            return None
        if self.by_reference:
            weights = self._finetune.get(stored)
            return TaskTensor(weights[: base.shape[0]] if base.dim() else weights, base)
        assert self._stored is not None
        if own_base is not None and own_base is not base:
            return TaskTensor(self._stored.get(canonical) + own_base.to(torch.float32), base)
        return TaskTensor(self._stored.get(canonical))

    def weights(self, canonical: str, base: torch.Tensor) -> torch.Tensor | None:
        """This model's own tensor (a layer-stacking merge copies it): as stored for a full fine-tune
        (every row), the base's `base` plus the task vector for a LoRA; None where it has no task
        vector (buffers, integer tensors: the base's are the model's)."""
        stored = self._manifest["tensors"].get(canonical)
        if stored is None:
            return None
        if self.by_reference:
            return self._finetune.get(stored)
        assert self._stored is not None
        return base.to(torch.float32) + self._stored.get(canonical)

    def get(self, canonical: str, base: torch.Tensor) -> torch.Tensor:
        """The fp32 task vector of one tensor, materialized (for inspection; merges stream it)."""
        source = self.tensor(canonical, base)
        if source is None:
            raise KeyError(canonical)
        whole = source.oriented(False)
        return whole.rows(0, whole.weights.shape[0]).reshape(base.shape)

    def buffers(self, which: str) -> list[str]:
        """Buffers of the fine-tune the base lacks (`skipped`: not written) or of the base the
        fine-tune lacks (`lacking`: the base's are copied), as each checkpoint names them."""
        return list(self._manifest.get("buffers", {}).get(which, []))

    def extra_rows(self) -> dict[str, int]:
        """canonical tensor -> rows this fine-tune added beyond the base vocabulary."""
        return dict(self._manifest.get("extra_rows", {}))

    def extra(self, canonical: str) -> torch.Tensor:
        assert self._stored is not None
        return self._stored.get(f"{canonical}{EXTRA_ROWS}")


def build_task_vector(folder: Path, name: str, source: ModelSource, base: ModelSource, arch: Architecture,
                      extra_tokens: str, check_base: bool, base_ref: str, reporter: Reporter) -> None:
    """Check one fine-tune against the base and write its task-vector artifact into `folder`."""
    with Checkpoint.open(base.path) as base_ckpt:
        if source.kind == "lora":
            adapter = LoraAdapter(source.path)
            _check_adapter_base(name, adapter.base_model, base_ref, base.path, check_base)
            manifest = _write_lora(name, adapter, base_ckpt, arch, folder / FILENAME, reporter)
        else:
            ft_type = source.config().get("model_type")
            if ft_type != arch.model_type:
                raise ModelMismatchError(f"{name}: architecture {ft_type!r} does not match the base's "
                                         f"{arch.model_type!r}")
            manifest = _reference_full(name, source, base_ckpt, arch, extra_tokens, folder / FILENAME, reporter)
    (folder / MANIFEST).write_text(json.dumps({"model": name, "kind": source.kind, **manifest}, indent=1))


def _write(name: str, path: Path, infos: list[TensorInfo], tensor_of: Callable[[str], torch.Tensor],
           reporter: Reporter) -> None:
    with StreamingWriter(path, infos, {"model": name}) as writer, \
            reporter.track(f"task vector {name}", len(infos)) as advance:
        for info in infos:
            tensor = tensor_of(info.name)
            if not torch.isfinite(tensor).all():
                raise MergeCliError(f"{name}: tensor {info.name} has NaN/Inf entries in its task vector",
                                    "the checkpoint (or the base) is corrupt")
            writer.write(info.name, tensor)
            advance(1)


def _reference_full(name: str, source: ModelSource, base: Checkpoint, arch: Architecture, extra_tokens: str,
                    path: Path, reporter: Reporter) -> dict:
    """Check a full fine-tune against the base and map its tensors; only added-token rows are copied."""
    with Checkpoint.open(source.path) as ft:
        base_map, ft_map = by_canonical(base, arch), by_canonical(ft, arch)
        grown = _check_match(name, base, base_map, ft, ft_map, arch, extra_tokens)
        tensors = {c: ft_map[c] for c in base_map
                   if c in ft_map and not arch.is_buffer(c) and _is_delta(name, c, base, base_map[c], ft, ft_map[c])}
        extra = {c: ft.info(ft_map[c]).shape[0] - base.info(base_map[c]).shape[0] for c in grown}
        if extra:
            infos = [TensorInfo(f"{c}{EXTRA_ROWS}", (rows, *base.info(base_map[c]).shape[1:]), ft.info(ft_map[c]).dtype)
                     for c, rows in extra.items()]

            def added_rows(row_name: str) -> torch.Tensor:
                canonical = row_name.removesuffix(EXTRA_ROWS)
                return ft.get(ft_map[canonical])[-extra[canonical]:]

            _write(name, path, infos, added_rows, reporter)
        skipped = sorted(ft_map[c] for c in ft_map if c not in base_map)  # buffers only: others were refused
        lacking = sorted(base_map[c] for c in base_map if c not in ft_map)  # buffers only, likewise
    return {"storage": "reference", "tensors": tensors, "extra_rows": extra,
            "buffers": {"skipped": skipped, "lacking": lacking}}


def _is_delta(model: str, canonical: str, base: Checkpoint, base_name: str, ft: Checkpoint, ft_name: str) -> bool:
    """Whether a tensor has a task vector: both floating point. An integer tensor must equal the
    base's; a float/integer mix (a quantized checkpoint) is refused."""
    b, f = base.info(base_name).dtype, ft.info(ft_name).dtype
    if b.is_floating_point and f.is_floating_point:
        return True
    if b.is_floating_point or f.is_floating_point:
        raise ModelMismatchError(f"{model}: tensor {canonical} is {str(f).removeprefix('torch.')} in the fine-tune and "
                                 f"{str(b).removeprefix('torch.')} in the base; mergecli merges floating-point "
                                 "weights only", "dequantize the checkpoint first")
    if b != f or not torch.equal(base.get(base_name), ft.get(ft_name)):
        raise ModelMismatchError(f"{model}: integer tensor {canonical} ({str(f).removeprefix('torch.')}) differs from "
                                 "the base's; integer tensors cannot be merged")
    return False


def by_canonical(ckpt: Checkpoint, arch: Architecture) -> dict[str, str]:
    """canonical name -> the name stored in this checkpoint, for every tensor the files hold (a
    tied pair saved twice is one entry: its first name as stored, or the canonical one)."""
    found: dict[str, str] = {}
    for name in ckpt.names():
        key = arch.canonical(name)
        if key == name or key not in found:
            found[key] = name
    return found


def _check_match(model: str, base: Checkpoint, base_map: dict[str, str], ft: Checkpoint,
                 ft_map: dict[str, str], arch: Architecture, extra_tokens: str) -> list[str]:
    """Names and shapes must agree; the error lists the first few disagreements.

    A fine-tune tensor the base lacks is refused naming it and its file: whatever it carries would
    be lost. Buffers (`Architecture.is_buffer`) are exempt both ways. The one allowed shape
    difference is a fine-tune with added tokens (more rows in vocab-indexed tensors) when the
    recipe says what to do with them (`extra_tokens: base | union`); the returned names are those
    tensors. With `vocabulary` (a recipe's `tokenizer.source`) the embeddings may have any number
    of rows: the merge re-maps them by token.
    """
    problems = [f"missing in the fine-tune: {base_map[n]}" for n in base_map
                if n not in ft_map and not arch.is_buffer(n)]
    problems += [f"not in the base: {ft_map[n]} (in {ft.file_of(ft_map[n])})" for n in ft_map
                 if n not in base_map and not arch.is_buffer(n)]
    grown = []
    for name in sorted(base_map.keys() & ft_map.keys()):
        b, f = base.info(base_map[name]).shape, ft.info(ft_map[name]).shape
        if b == f or arch.is_buffer(name):
            continue
        if extra_tokens == "vocabulary" and arch.module_of(name) in arch.embeddings and f[1:] == b[1:]:
            continue  # rows re-mapped by token at merge time, read from the fine-tune as they are
        if len(b) == 2 and f[1:] == b[1:] and f[0] > b[0] and extra_tokens != "error":
            grown.append(name)
        else:
            hint = (" (added tokens? set extra_tokens: base or union, or tokenizer.source to re-map rows by token)"
                    if len(b) == 2 and f[1:] == b[1:] else "")
            problems.append(f"{name}: shape {list(f)} in the fine-tune, {list(b)} in the base{hint}")
    if problems:
        more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ModelMismatchError(f"{model} does not match the base: " + "; ".join(problems[:5]) + more,
                                 "a fine-tune's tensors must be the base's; mergecli drops none of them")
    return grown


def _write_lora(name: str, adapter: LoraAdapter, base: Checkpoint, arch: Architecture, path: Path,
                reporter: Reporter) -> dict:
    stored = by_canonical(base, arch)
    names = adapter.tensor_names(arch)
    missing = [n for n in names if n not in stored]
    if missing:
        raise ModelMismatchError(f"{name}: the adapter targets tensors the base does not have: "
                                 + ", ".join(missing[:5]), "is it an adapter for another base model?")
    not_float = [n for n in names if not base.info(stored[n]).dtype.is_floating_point]
    if not_float:
        raise ModelMismatchError(f"{name}: the adapter changes non-floating-point tensor {not_float[0]} "
                                 f"({base.info(stored[not_float[0]]).dtype})")
    order = {n: i for i, n in enumerate(stored)}
    names.sort(key=order.__getitem__)
    infos = [TensorInfo(n, base.info(stored[n]).shape, torch.float32) for n in names]
    _write(name, path, infos, lambda n: adapter.delta(n, stored[n], base, arch), reporter)
    return {"storage": "materialized", "tensors": {n: n for n in names}}


def _check_adapter_base(name: str, recorded: str | None, base_ref: str, base_path: Path, check: bool) -> None:
    """peft records the base as given at training time (a hub id, or wherever the base then was):
    accept it if its last path component matches the recipe's base reference or its folder."""
    if not recorded or not check:
        return

    def stem(ref: str | Path) -> str:
        return Path(str(ref).split("@")[0].rstrip("/")).name.lower()

    if stem(recorded) not in (stem(base_ref), stem(base_path)):
        raise ModelMismatchError(
            f"{name}: adapter was trained on {recorded!r}, the recipe's base is {base_ref!r}",
            f"if they are the same model, set models.{name}.check_base: false")
