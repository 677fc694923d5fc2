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
from dataclasses import dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import MergeCliError
from ..fsutil import cache_root

if TYPE_CHECKING:
    from torch import nn

_LAYER = re.compile(r"\.(\d+)\.")
CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "seq_length", "max_sequence_length")
# buffers older transformers versions saved in checkpoints: causal masks of GPT-2/GPT-J/GPT-NeoX
# attention, rotary frequency tables
LEGACY_BUFFER = re.compile(r"(^|\.)(attn|attention|self_attn)\.(bias|masked_bias)$|(^|\.)(inv_freq|original_inv_freq)$")
FORMAT = "4"  # of the cached descriptions: a new field makes every older entry stale


@dataclass(frozen=True)
class Architecture:
    """How each tensor of a checkpoint is treated. A checkpoint's stored names are the truth (every
    tensor in the files is merged or accounted for); the model class is only the lens that says
    what a tensor is: a linear layer's weight (and its orientation), a tied alias, a buffer."""

    model_type: str
    tied: dict[str, str]  # alias parameter name -> canonical parameter name (module-tree names)
    linear: frozenset[str]  # weight names of nn.Linear / Conv1D layers (module-tree names)
    transposed: frozenset[str]  # weights stored in x out
    num_layers: int = 0  # decoder blocks
    context: int | None = None  # longest sequence the position embeddings allow, if the config says
    # the model's own parameter names, and the prefix of its base model (`transformer` for GPT-2):
    # checkpoints written before the LM-head class existed (the hub's gpt2) store `h.0...` where
    # the model, and every fine-tune saved by transformers today, say `transformer.h.0...`
    params: frozenset[str] = frozenset()
    prefix: str = ""
    # checkpoint name -> the parameter it is (or is a slice of) where the two differ: transformers 5
    # renames and fuses keys on load (GPT-NeoX's file `embed_out` is the module `lm_head`; MoE
    # experts stored one tensor per expert are one fused tensor per layer in the module tree)
    saved: dict[str, str] = field(default_factory=dict)
    sliced: frozenset[str] = frozenset()  # checkpoint names that are one expert's slice of a fused parameter
    buffers: frozenset[str] = frozenset()  # the model's buffers (rotary tables, masks): no weights
    embeddings: frozenset[str] = frozenset()  # the input and output embeddings' weights (an output layer is one)
    # parameters outside the decoder stack that the model registers before it (the input embedding,
    # position embeddings): a layer-stacking merge takes them from its first block, the others
    # (final norm, output layer) from its last
    before_stack: frozenset[str] = frozenset()

    def _known(self, name: str) -> bool:
        return name in self.params or name in self.saved or name in self.buffers

    def _prefixed(self, name: str) -> str:
        """With the base model's prefix where the checkpoint lacks it (a legacy checkpoint)."""
        prefixed = f"{self.prefix}.{name}"
        return prefixed if self.prefix and not self._known(name) and self._known(prefixed) else name

    def module_of(self, name: str) -> str:
        """The module-tree parameter a checkpoint tensor is (or is a slice of): the name statistics,
        the loaded model and the linear-layer table use."""
        name = self._prefixed(name)
        return self.saved.get(name, name)

    def canonical(self, name: str) -> str:
        """The key under which a checkpoint tensor of the base and of each fine-tune meet: its name
        with the base model's prefix where a legacy checkpoint lacks it, and a tied alias as the
        first of its group (tied pairs are often saved once)."""
        name = self._prefixed(name)
        tied = self.tied.get(self.saved.get(name, name))
        return name if tied is None else self.checkpoint_name(tied)

    def checkpoint_name(self, module: str) -> str:
        """The name transformers saves a (not fused) module-tree parameter under: LoRA adapters
        and loaded models speak module names, checkpoints may not (GPT-NeoX's `lm_head` is
        `embed_out` in the files)."""
        return next((f for f, m in self.saved.items() if m == module and f not in self.sliced), module)

    def is_linear(self, name: str) -> bool:
        """A linear layer's weight inside the model (an expert's projection included: a slice of a
        fused expert tensor is one expert's nn.Linear-shaped out x in weight); the output layer is
        an embedding, not one of these, even where it is an nn.Linear."""
        name = self._prefixed(name)
        module = self.saved.get(name, name)
        expert = name in self.sliced and name.endswith(".weight")
        return module not in self.embeddings and (module in self.linear or expert)

    def is_transposed(self, name: str) -> bool:
        """Stored in x out (GPT-2's Conv1D): row-wise math must transpose it first."""
        return self.module_of(name) in self.transposed

    def is_buffer(self, name: str) -> bool:
        """A tensor that is no parameter of the model but one of its buffers, or a buffer older
        transformers saved (GPT-2's causal masks `h.N.attn.bias`, rotary `inv_freq` tables): it
        carries no weights, so it is copied from the base and a fine-tune need not have it."""
        module = self.module_of(name)
        return module not in self.params and (module in self.buffers or LEGACY_BUFFER.search(module) is not None)

    def layer_of(self, name: str) -> int | None:
        """The decoder block a tensor belongs to (its first `.N.` index), None outside the stack."""
        match = _LAYER.search(name)
        return int(match.group(1)) if match and self.num_layers else None

    def renumbered(self, name: str, layer: int) -> str:
        """`name` (a tensor of the decoder stack) moved to block `layer`: its first `.N.` index
        replaced, the same index `layer_of` reads."""
        return _LAYER.sub(f".{layer}.", name, count=1)

    def is_before_stack(self, name: str) -> bool:
        """A tensor outside the decoder stack that the model registers before it (the input
        embedding); False for those after it (final norm, output layer)."""
        return self.module_of(name) in self.before_stack


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
    key = hashlib.sha256(raw + f"{version('transformers')}:{FORMAT}".encode()).hexdigest()[:24]
    return _described(key, Path(config_folder))


@lru_cache(maxsize=16)
def _described(key: str, config_folder: Path) -> Architecture:

    cached = cache_root() / "arch" / f"{key}.json"
    try:
        data = json.loads(cached.read_text())
        return Architecture(**{f.name: frozenset(data[f.name]) if isinstance(f.default, frozenset) else data[f.name]
                               for f in fields(Architecture)})
    except (OSError, ValueError, KeyError, TypeError):
        pass
    arch = _describe_from_config(config_folder)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({f.name: sorted(v) if isinstance(v, frozenset) else v
                               for f in fields(Architecture) for v in [getattr(arch, f.name)]}))
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
    params = dict(model.named_parameters(remove_duplicate=False))
    saved, sliced = saved_names(model, params)
    before: set[str] = set()
    for name in params:  # registration order: the stack's first parameter ends the part before it
        if _LAYER.search(name):
            break
        before.add(name)
    layers = [model.get_input_embeddings(), model.get_output_embeddings()]
    embeddings = {name for name, p in params.items() if any(m is not None and p is m.weight for m in layers)}
    return Architecture(model.config.model_type, tied, frozenset(linear), frozenset(transposed), depth, context,
                        frozenset(params), getattr(model, "base_model_prefix", "") or "", saved, frozenset(sliced),
                        frozenset(name for name, _ in model.named_buffers()), frozenset(embeddings),
                        frozenset(before) if depth else frozenset())


def saved_names(model: "nn.Module", params: dict[str, "nn.Parameter"]) -> tuple[dict[str, str], set[str]]:
    """What transformers' `save_pretrained` calls each parameter in the files, where that differs
    from the module tree (the reverse of the key conversion it applies on load): checkpoint name ->
    parameter, and the checkpoint names that are one slice of a fused parameter (MoE experts). Asked
    of transformers itself, one parameter at a time on the meta device (no memory): a conversion
    table written here would go stale with the next release. Without that machinery (another
    transformers version) names are taken as they are: tensors the class renames are then merged
    as plain tensors, never dropped."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return {}, set()
    try:
        kept = set(revert_weight_conversion(model, dict(params)))
    except Exception:  # noqa: BLE001 - a conversion that cannot run on meta tensors: names as they are
        return {}, set()
    saved: dict[str, str] = {}
    sliced: set[str] = set()
    for name in params:
        if name in kept:
            continue
        stored = list(revert_weight_conversion(model, {name: params[name]}))
        saved.update((s, name) for s in stored)
        if len(stored) > 1:
            sliced.update(stored)
    return saved, sliced


def decoder_layers(model: "nn.Module") -> "nn.ModuleList":
    """The stack of decoder blocks: the ModuleList holding the most parameters."""
    from torch import nn

    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"{type(model).__name__}: no decoder layer stack found")
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))
