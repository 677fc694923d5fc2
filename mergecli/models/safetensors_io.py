"""Streaming safetensors I/O: lazy reads of model folders, sequential writes of planned shards.

Reading goes through safetensors' own `safe_open` (memory-mapped). Writing cannot: the library
only saves a whole dict at once, which would hold a full shard in memory. Since every output
tensor's name, shape and dtype is known before the merge starts (they are the base model's), the
header of each shard can be written first and tensor bytes appended one at a time, so memory
stays at one tensor whatever the model size. The format is documented and tiny: an 8-byte
little-endian header length, a JSON header padded with spaces to 8 bytes, then raw bytes.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors import safe_open

from ..errors import MergeCliError

ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in ST_DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


def read_header(path: Path) -> dict:
    """The JSON header of a safetensors file; raises MergeCliError if the file is not one."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("file shorter than its length prefix")
            (size,) = struct.unpack("<Q", raw)
            if size > 100 * 2**20 or size > os.path.getsize(path) - 8:
                raise ValueError("header length beyond end of file")
            header = json.loads(f.read(size))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + size + end != os.path.getsize(path):
            raise ValueError(f"size {os.path.getsize(path)} != {8 + size + end} promised by its header")
        return header
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise MergeCliError(f"{path}: not a valid safetensors file ({exc})") from None


class Checkpoint:
    """Lazy, name-addressed tensor access over a folder of weights (safetensors or .bin).

    Safetensors (single file or sharded with an index) are opened with `safe_open` per tensor: the
    memory map is dropped as soon as the tensor is copied out, so pages of tensors already merged
    do not stay resident (keeping one handle open made peak RSS grow with model depth: 672 MB at 4
    layers vs 1139 MB at 16 in our measurement; reopening keeps it flat at 411 MB). Legacy `.bin`
    files are loaded with `weights_only=True` and `mmap=True`, so no pickle code runs.
    """

    def __init__(self, folder: Path, files: dict[str, Path], infos: dict[str, TensorInfo],
                 bin_state: dict[str, torch.Tensor] | None = None) -> None:
        self.folder = folder
        self._files = files
        self._infos = infos
        self._bin = bin_state

    @classmethod
    def open(cls, folder: Path, prefix: str = "model") -> "Checkpoint":
        folder = Path(folder)
        index = folder / f"{prefix}.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted({folder / f for f in weight_map.values()})
        else:
            shards = sorted(folder.glob("*.safetensors"))
        if shards:
            files: dict[str, Path] = {}
            infos: dict[str, TensorInfo] = {}
            for shard in shards:
                if not shard.is_file():
                    raise MergeCliError(f"{index}: lists missing shard {shard.name}")
                header = read_header(shard)
                for name, meta in header.items():
                    if name == "__metadata__":
                        continue
                    if meta["dtype"] not in ST_DTYPES:
                        raise MergeCliError(f"{shard}: tensor {name} has unsupported dtype {meta['dtype']}")
                    files[name] = shard
                    infos[name] = TensorInfo(name, tuple(meta["shape"]), ST_DTYPES[meta["dtype"]])
            return cls(folder, files, infos)
        bins = sorted(folder.glob("pytorch_model*.bin")) or sorted(folder.glob("*.bin"))
        if bins:
            state: dict[str, torch.Tensor] = {}
            for path in bins:
                try:
                    state.update(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
                except Exception as exc:  # noqa: BLE001 - torch raises many kinds here
                    raise MergeCliError(f"{path}: cannot load as a weights-only PyTorch checkpoint ({exc})") from None
            infos = {k: TensorInfo(k, tuple(v.shape), v.dtype) for k, v in state.items()}
            return cls(folder, {k: folder for k in state}, infos, bin_state=state)
        raise MergeCliError(f"{folder}: no weights found (*.safetensors or pytorch_model*.bin)")

    def names(self) -> list[str]:
        return list(self._infos)

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    def info(self, name: str) -> TensorInfo:
        return self._infos[name]

    def get(self, name: str) -> torch.Tensor:
        if self._bin is not None:
            return self._bin[name]
        with safe_open(str(self._files[name]), framework="pt") as handle:
            return handle.get_tensor(name)

    def close(self) -> None:
        self._bin = None

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StreamingWriter:
    """Writes one safetensors file whose tensors are declared up front and appended in order."""

    def __init__(self, path: Path, tensors: list[TensorInfo], metadata: dict[str, str] | None = None) -> None:
        header: dict[str, object] = {"__metadata__": {"format": "pt", **(metadata or {})}}
        offset = 0
        for info in tensors:
            header[info.name] = {"dtype": DTYPE_NAMES[info.dtype], "shape": list(info.shape),
                                 "data_offsets": [offset, offset + info.nbytes]}
            offset += info.nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self.path = path
        self._pending = list(tensors)
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(blob)) + blob)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = self._pending.pop(0) if self._pending else None
        if expected is None or expected.name != name:
            raise RuntimeError(f"{self.path}: got {name}, expected {expected.name if expected else 'nothing'}")
        if tuple(tensor.shape) != expected.shape or tensor.dtype != expected.dtype:
            raise RuntimeError(f"{name}: {tuple(tensor.shape)} {tensor.dtype} != declared {expected.shape} {expected.dtype}")
        data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        self._file.write(memoryview(data))

    def close(self) -> None:
        if self._pending:
            raise RuntimeError(f"{self.path}: {len(self._pending)} declared tensors never written")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def abort(self) -> None:
        self._file.close()


def plan_shards(tensors: Iterable[TensorInfo], max_bytes: int) -> list[list[TensorInfo]]:
    """Greedy split in the given order; a tensor larger than max_bytes gets a shard of its own."""
    shards: list[list[TensorInfo]] = [[]]
    size = 0
    for info in tensors:
        if shards[-1] and size + info.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(info)
        size += info.nbytes
    return shards


class ShardedWriter:
    """Writes a Hugging Face weight set: `model.safetensors`, or numbered shards plus an index."""

    def __init__(self, folder: Path, tensors: list[TensorInfo], max_shard_bytes: int, prefix: str = "model") -> None:
        self.folder = folder
        self.plan = plan_shards(tensors, max_shard_bytes)
        n = len(self.plan)
        self.filenames = ([f"{prefix}.safetensors"] if n == 1 else
                          [f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
        self._shard = -1
        self._writer: StreamingWriter | None = None
        self._left = 0

    @property
    def order(self) -> Iterator[TensorInfo]:
        """The order tensors must be written in."""
        for shard in self.plan:
            yield from shard

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._left == 0:
            self._next_shard()
        assert self._writer is not None
        self._writer.write(name, tensor)
        self._left -= 1

    def _next_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._shard += 1
        self._writer = StreamingWriter(self.folder / self.filenames[self._shard], self.plan[self._shard])
        self._left = len(self.plan[self._shard])

    def close(self) -> list[str]:
        """Finish the last shard, write the index if sharded; returns the files written."""
        if self._writer is None:
            self._next_shard()
        if self._shard != len(self.plan) - 1:
            raise RuntimeError(f"{self.folder}: closed after shard {self._shard + 1} of {len(self.plan)}")
        assert self._writer is not None
        self._writer.close()
        if len(self.filenames) == 1:
            return self.filenames
        weight_map = {info.name: self.filenames[i] for i, shard in enumerate(self.plan) for info in shard}
        total = sum(info.nbytes for shard in self.plan for info in shard)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2))
        return self.filenames + [INDEX_NAME]

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
