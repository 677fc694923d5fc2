"""What the merge needs to know about an architecture, read off the model itself.

Instead of per-family name lists, the model class is instantiated on the meta device (no memory,
no weights) from the checkpoint's config, and asked: which parameters are tied to which (tied
embeddings must be merged once and stay tied), and which weights belong to linear layers and in
which orientation (GPT-2's Conv1D stores in x out; per-row selection needs out x in).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from ..errors import MergeCliError


@dataclass(frozen=True)
class Architecture:
    model_type: str
    tied: dict[str, str]  # alias parameter name -> canonical parameter name
    linear: frozenset[str]  # weight names of nn.Linear / Conv1D layers
    transposed: frozenset[str]  # weights stored in x out

    def canonical(self, name: str) -> str:
        return self.tied.get(name, name)


@lru_cache(maxsize=16)
def describe(config_folder: Path) -> Architecture:
    """The architecture of the model whose config.json is in `config_folder`.

    Building the model class costs seconds (importing its transformers module), so the answer is
    cached on disk, keyed by the exact bytes of config.json and the transformers version (read
    from the package metadata: importing transformers alone costs most of a second).
    """
    from importlib.metadata import version

    from .gguf import cache_root

    raw = (Path(config_folder) / "config.json").read_bytes() if (Path(config_folder) / "config.json").is_file() else b""
    key = hashlib.sha256(raw + version("transformers").encode()).hexdigest()[:24]
    cached = cache_root() / "arch" / f"{key}.json"
    try:
        data = json.loads(cached.read_text())
        return Architecture(data["model_type"], data["tied"], frozenset(data["linear"]), frozenset(data["transposed"]))
    except (OSError, ValueError, KeyError):
        pass
    arch = _describe_from_config(config_folder)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"model_type": arch.model_type, "tied": arch.tied, "linear": sorted(arch.linear),
                               "transposed": sorted(arch.transposed)}))
    os.replace(tmp, cached)
    return arch


def _describe_from_config(config_folder: Path) -> Architecture:
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(config_folder)
    except Exception as exc:  # noqa: BLE001
        raise MergeCliError(f"{config_folder}: cannot read config.json ({str(exc).splitlines()[0]})") from None
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # noqa: BLE001
        raise MergeCliError(f"{config_folder}: model_type {config.model_type!r} is not a causal LM "
                            f"transformers can build ({str(exc).splitlines()[0]})") from None
    return describe_model(model)


def describe_model(model: torch.nn.Module) -> Architecture:
    """Tied pairs and linear layers of an instantiated (possibly meta) model."""
    from transformers.pytorch_utils import Conv1D

    first_name: dict[int, str] = {}
    tied: dict[str, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        canonical = first_name.setdefault(id(param), name)
        if canonical != name:
            tied[name] = canonical
    linear, transposed = set(), set()
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, Conv1D)):
            linear.add(f"{name}.weight")
            if isinstance(module, Conv1D):
                transposed.add(f"{name}.weight")
    return Architecture(model.config.model_type, tied, frozenset(linear), frozenset(transposed))
