"""The merges a scale is chosen over (`writer.write_parts`), read back to write the chosen merge.

`lambda: auto` and `lambda: learned` score base + sum_j c_j part_j, where part_j is the variant's
change from the base at lambda 1 (whole, or one fine-tune's part alone). Writing the chosen merge
from those same parts costs one read of them per tensor instead of a second merge (at 7B widths a
second RegMean merge is half an hour of solves and a Gram factor per tensor), and the weights
written are the sum that was scored, computed the same way (`methods.combine.scaled_sum`), at
the scales the choice records (learned ones rounded to 6 decimals). What the
parts' merge kept of each tensor (entries kept and offered, statistics missing) is stored beside
them, so the written folder reports the same density a merge would.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..methods.combine import scaled_sum
from ..models.safetensors_io import Checkpoint

COUNTS = "counts.json"  # per tensor of the parts: [entries kept, entries offered, statistics missing]


def part_folders(folder: Path, parts: int) -> list[Path]:
    """Where `write_parts` puts each part: its own checkpoint folder."""
    return [folder / f"part-{i}" for i in range(parts)]


def write_counts(folder: Path, counts: dict[str, tuple[int, int, bool]]) -> None:
    (folder / COUNTS).write_text(json.dumps({name: list(c) for name, c in counts.items()}))


@dataclass(frozen=True)
class StoredParts:
    """A parts artifact as the writer reads it (`read`): for each tensor the parts hold, the chosen
    merge `base + sum_j factors(canonical)[j] * part_j` in fp32 (a factor of None or 0 adds
    nothing), and what the parts' merge kept of it. Safe to read from several threads at once."""

    files: tuple[Checkpoint, ...]
    factors: Callable[[str], Sequence[float | None]]  # canonical tensor name -> a factor per part
    names: dict[str, str]  # canonical -> the name the parts store it under
    kept: dict[str, tuple[int, int, bool]]  # canonical -> entries kept, offered, statistics missing

    @classmethod
    def read(cls, folder: Path, count: int, factors: Callable[[str], Sequence[float | None]],
             canonical: Callable[[str], str]) -> "StoredParts":
        raw = json.loads((folder / COUNTS).read_text())
        return cls(tuple(Checkpoint.open(f) for f in part_folders(folder, count)), factors,
                   {canonical(name): name for name in raw},
                   {canonical(name): (int(k), int(n), bool(m)) for name, (k, n, m) in raw.items()})

    def merged(self, canonical: str, base: torch.Tensor) -> torch.Tensor:
        """The chosen merge of one tensor: the base's (as stored) plus each part times its factor."""
        name = self.names[canonical]
        return scaled_sum(base, [(f.get(name) if c else None, c) for f, c in zip(self.files, self.factors(canonical))])
