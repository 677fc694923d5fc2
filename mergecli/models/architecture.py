"""What the merge needs to know about an architecture, read off the model itself.

Instead of per-family name lists, the model class is instantiated on the meta device (no memory,
no weights) from the checkpoint's config, and asked: which parameters are tied to which (tied
embeddings must be merged once and stay tied), which weights belong to linear layers and in
which orientation (GPT-2's Conv1D stores in x out; per-row selection needs out x in), and how
deep the decoder stack is (per-layer parameter schedules).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import MergeCliError

if TYPE_CHECKING:
    from torch import nn

_LAYER = re.compile(r"\.(\d+)\.")
CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "seq_length", "max_sequence_length")


@dataclass(frozen=True)
class Architecture:
    model_type: str
    tied: dict[str, str]  # alias parameter name -> canonical parameter name
    linear: frozenset[str]  # weight names of nn.Linear / Conv1D layers
    transposed: frozenset[str]  # weights stored in x out
    num_layers: int = 0  # decoder blocks
    context: int | None = None  # longest sequence the position embeddings allow, if the config says
    # the model's own parameter names, and the prefix of its base model (`transformer` for GPT-2):
    # checkpoints written before the LM-head class existed (the hub's gpt2) store `h.0...` where
    # the model, and every fine-tune saved by transformers today, say `transformer.h.0...`
    params: frozenset[str] = frozenset()
    prefix: str = ""

    def canonical(self, name: str) -> str:
        """The model's name for a checkpoint tensor: the first of a tied group, and with the base
        model's prefix where the checkpoint lacks it, so a legacy base and its fine-tunes meet."""
        prefixed = f"{self.prefix}.{name}"
        if self.prefix and name not in self.params and prefixed in self.params:
            name = prefixed
        return self.tied.get(name, name)

    def layer_of(self, name: str) -> int | None:
        """The decoder block a tensor belongs to (its first `.N.` index), None outside the stack."""
        match = _LAYER.search(name)
        return int(match.group(1)) if match and self.num_layers else None


def describe(config_folder: Path) -> Architecture:
    """The architecture of the model whose config.json is in `config_folder`.

    Building the model class costs seconds (importing its transformers module), so the answer is
    cached in memory and on disk, keyed by the exact bytes of config.json and the transformers
    version (read from the package metadata: importing transformers alone costs most of a second),
    never by the folder alone: a folder whose config changed is another model.
    """
    from importlib.metadata import version

    config_path = Path(config_folder) / "config.json"
    try:
        raw = config_path.read_bytes()
        json.loads(raw)
    except (OSError, ValueError) as exc:
        raise MergeCliError(f"{config_path}: cannot read a JSON config ({str(exc).splitlines()[0]})") from None
    return _described(hashlib.sha256(raw + version("transformers").encode()).hexdigest()[:24], Path(config_folder))


@lru_cache(maxsize=16)
def _described(key: str, config_folder: Path) -> Architecture:
    from .gguf import cache_root

    cached = cache_root() / "arch" / f"{key}.json"
    try:
        data = json.loads(cached.read_text())
        return Architecture(data["model_type"], data["tied"], frozenset(data["linear"]), frozenset(data["transposed"]),
                            data["num_layers"], data["context"], frozenset(data["params"]), data["prefix"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    arch = _describe_from_config(config_folder)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"model_type": arch.model_type, "tied": arch.tied, "linear": sorted(arch.linear),
                               "transposed": sorted(arch.transposed), "num_layers": arch.num_layers,
                               "context": arch.context, "params": sorted(arch.params), "prefix": arch.prefix}))
    os.replace(tmp, cached)
    return arch


def _describe_from_config(config_folder: Path) -> Architecture:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(config_folder, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001
        raise MergeCliError(f"{config_folder}: cannot read config.json ({str(exc).splitlines()[0]})") from None
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001
        raise MergeCliError(f"{config_folder}: model_type {config.model_type!r} is not a causal LM "
                            f"transformers can build ({str(exc).splitlines()[0]})") from None
    return describe_model(model)


def describe_model(model: "nn.Module") -> Architecture:
    """Tied pairs, linear layers and depth of an instantiated (possibly meta) model."""
    import torch
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
    try:
        depth = len(decoder_layers(model))
    except ValueError:
        depth = 0
    context = next((getattr(model.config, f) for f in CONTEXT_FIELDS
                    if isinstance(getattr(model.config, f, None), int)), None)
    params = frozenset(name for name, _ in model.named_parameters(remove_duplicate=False))
    return Architecture(model.config.model_type, tied, frozenset(linear), frozenset(transposed), depth, context,
                        params, getattr(model, "base_model_prefix", "") or "")


def decoder_layers(model: "nn.Module") -> "nn.ModuleList":
    """The stack of decoder blocks: the ModuleList holding the most parameters."""
    from torch import nn

    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"{type(model).__name__}: no decoder layer stack found")
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))
