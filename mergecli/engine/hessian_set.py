"""A fine-tune's calibration statistics as the stages hand them around: which artifact holds them,
and what its `hessian.json` says (torch-free: the stage modules import it while the CLI builds its
`--help`; the tensors are read by `hessians.HessianReader`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..store.workspace import Artifact

FILENAME = "hessian.safetensors"
META = "hessian.json"


def read_meta(folder: Path) -> dict:
    return json.loads((folder / META).read_text())


@dataclass(frozen=True)
class HessianSet:
    model: str
    artifact: "Artifact"
    reused: bool

    @cached_property
    def meta(self) -> dict:
        return read_meta(self.artifact.path)
