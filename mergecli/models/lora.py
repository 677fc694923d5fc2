"""LoRA adapters as task vectors, computed tensor by tensor without loading the full model.

peft reads the adapter (its own `load_peft_weights` and `LoraConfig`); the delta of each
targeted module is then what `merge_and_unload` would add to the base:

- Linear / Conv1D: `scaling * B @ A`, transposed when `fan_in_fan_out` (GPT-2 Conv1D);
- Embedding: `scaling * (B @ A)^T` (peft stores embedding factors the other way round);
- full tensors saved beside the adapter (`modules_to_save`, saved embedding layers): saved - base,
  added to the low-rank delta when the same module has both (peft saves a LoRA-targeted
  embedding's base layer too).

scaling = alpha / r, or alpha / sqrt(r) with rank-stabilised LoRA; per-module `alpha_pattern`
entries override alpha, and r is read off the factor's shape (so `rank_pattern` needs no lookup).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import MergeCliError, ModelMismatchError
from .architecture import Architecture
from .safetensors_io import Checkpoint

PREFIX = "base_model.model."
FACTORS = {".lora_A.weight": ("linear", "A"), ".lora_B.weight": ("linear", "B"),
           ".lora_embedding_A": ("embedding", "A"), ".lora_embedding_B": ("embedding", "B")}


@dataclass
class _Target:
    kind: str  # "linear" | "embedding" | "full"
    module: str
    keys: dict[str, str]


class LoraAdapter:
    """A peft LoRA adapter folder, queried one base tensor at a time."""

    def __init__(self, folder: Path) -> None:
        from peft import LoraConfig
        from peft.utils import load_peft_weights

        self.folder = folder
        try:
            self.config = LoraConfig.from_pretrained(str(folder))
        except Exception as exc:  # noqa: BLE001
            raise MergeCliError(f"{folder}: not a LoRA adapter peft can read ({str(exc).splitlines()[0]})") from None
        if getattr(self.config, "use_dora", False):
            raise MergeCliError(f"{folder}: DoRA adapters (use_dora: true) are not supported yet",
                                "merge the adapter into a full checkpoint with peft's merge_and_unload first")
        try:
            self.state = load_peft_weights(str(folder), device="cpu")
        except Exception as exc:  # noqa: BLE001 - safetensors/torch errors of a damaged adapter file
            raise MergeCliError(f"{folder}: cannot read the adapter weights ({str(exc).splitlines()[0]})") from None
        self._targets: dict[str, _Target] = {}
        for key in self.state:
            if "lora_magnitude_vector" in key:
                raise MergeCliError(f"{folder}: DoRA magnitude vectors found ({key}); DoRA is not supported yet")
            name = key.removeprefix(PREFIX)
            for suffix, (kind, factor) in FACTORS.items():
                if name.endswith(suffix):
                    module = name[: -len(suffix)]
                    target = self._targets.setdefault(f"{module}.weight", _Target(kind, module, {}))
                    target.kind = kind
                    target.keys[factor] = key
                    break
            else:  # a tensor saved whole: modules_to_save, or a (possibly resized) embedding's base layer
                full = name.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")
                target = self._targets.setdefault(full, _Target("full", full.removesuffix(".weight"), {}))
                target.keys["W"] = key

    @property
    def base_model(self) -> str | None:
        return self.config.base_model_name_or_path

    def tensor_names(self, arch: Architecture) -> list[str]:
        """Base tensor names this adapter changes (tied aliases mapped to their canonical name)."""
        names = [arch.canonical(arch.checkpoint_name(n)) for n in self._targets]
        if len(set(names)) != len(names):
            raise MergeCliError(f"{self.folder}: changes both halves of tied embeddings separately; "
                                "such an adapter unties them and cannot be merged into a tied base")
        return names

    def delta(self, name: str, stored: str, base: Checkpoint, arch: Architecture) -> torch.Tensor:
        """Task vector of one base tensor (fp32): `name` as `tensor_names` gives it, `stored` the
        base checkpoint's name for it."""
        target = next(t for module, t in self._targets.items() if arch.canonical(arch.checkpoint_name(module)) == name)
        shape = base.info(stored).shape
        delta = torch.zeros(shape)
        if "W" in target.keys:
            saved = self.state[target.keys["W"]].float()
            if tuple(saved.shape) != shape:
                raise ModelMismatchError(f"{self.folder}: {target.module} has shape {tuple(saved.shape)}, "
                                         f"base has {shape}")
            delta = saved - base.get(stored).float()
        if target.kind == "full":
            return delta
        if set(target.keys) - {"W"} != {"A", "B"}:
            raise MergeCliError(f"{self.folder}: {target.module} lacks lora_{'AB'[('A' in target.keys)]}")
        a, b = self.state[target.keys["A"]].float(), self.state[target.keys["B"]].float()
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] == 0 or b.shape[1] != a.shape[0]:
            raise MergeCliError(f"{self.folder}: {target.module} has LoRA factors of shapes A {tuple(a.shape)}, "
                                f"B {tuple(b.shape)}; they must be r x in and out x r with the same rank r > 0")
        low_rank = b @ a * self._scaling(target.module, rank=a.shape[0])
        if target.kind == "embedding" or self.config.fan_in_fan_out:
            low_rank = low_rank.T
        if tuple(low_rank.shape) != shape:
            raise ModelMismatchError(f"{self.folder}: LoRA delta of {target.module} has shape {tuple(low_rank.shape)}, "
                                     f"base tensor {name} has {shape} (adapter for another base?)")
        return (delta + low_rank).contiguous()

    def _scaling(self, module: str, rank: int) -> float:
        from peft.utils.other import get_pattern_key

        alpha = self.config.lora_alpha
        if self.config.alpha_pattern:
            alpha = self.config.alpha_pattern.get(get_pattern_key(self.config.alpha_pattern.keys(), module), alpha)
        return alpha / math.sqrt(rank) if self.config.use_rslora else alpha / rank
