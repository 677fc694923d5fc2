"""mergekit-moe configs (`mergecli moe CONFIG`), read and checked before any model is opened.

The keys are mergekit 0.1.5's `MoEMergeConfig` with its meaning: `base_model`, `experts` (each a
`source_model` with `positive_prompts`, `negative_prompts`, `residual_scale`), `gate_mode`,
`dtype`, `experts_per_token`, `shared_experts`, `architecture`. mergekit's own refusals
(`is_bad_config`, and which output architecture accepts the config) are transcribed, so a config
mergekit refuses is refused here, each as one RecipeError naming the key. What mergecli cannot do
is refused the same way: `noise_scale` (mergekit draws it from its global generator), `model+lora`
references, DeepSeek and Qwen3 outputs. Paths are relative to the config's folder, as for
mergekit configs run by `mergecli merge`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..errors import RecipeError
from .yaml_io import read_yaml_file

KEYS = ("base_model", "experts", "gate_mode", "dtype", "experts_per_token", "shared_experts", "architecture")
EXPERT_KEYS = ("source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale")
# mergekit's modes: hidden (= hidden_last) takes each prompt's last token, hidden_avg every position
GATE_MODES = ("hidden", "hidden_last", "hidden_avg", "cheap_embed", "random", "uniform_random")
RANDOM_MODES = ("random", "uniform_random")
DTYPES = ("float32", "float16", "bfloat16")
MIXTRAL, QWEN2_MOE = "mixtral", "qwen2_moe"  # the outputs: transformers' model_type of each
OUTPUT_NAMES = {MIXTRAL: "Mixtral", QWEN2_MOE: "Qwen MoE"}  # mergekit's names (`architecture:` is a prefix of one)
INPUT_TYPES = {MIXTRAL: ("llama", "mistral"), QWEN2_MOE: ("llama", "mistral", "qwen2")}


@dataclass(frozen=True)
class Expert:
    source_model: str
    positive_prompts: tuple[str, ...] = ()
    negative_prompts: tuple[str, ...] = ()
    residual_scale: float | None = None  # multiplies the expert's down_proj (its output)


@dataclass(frozen=True)
class MoEConfig:
    path: Path  # the config file (absolute)
    base_model: str
    experts: tuple[Expert, ...]
    gate_mode: str
    dtype: str | None
    experts_per_token: int
    shared_experts: tuple[Expert, ...]
    output: str  # MIXTRAL or QWEN2_MOE
    data: dict[str, Any]  # the config as read

    @property
    def root(self) -> Path:
        return self.path.parent

    @property
    def name(self) -> str:
        """The output folder's default name: the config's file name."""
        return re.sub(r"[^A-Za-z0-9._+-]", "-", self.path.stem).lstrip("._+-") or "moe"

    @property
    def gated(self) -> tuple[Expert, ...]:
        """The experts that get a router row, as mergekit lists them: the experts, then the shared
        expert where it has prompts or the gates are random (Qwen2-MoE's `shared_expert_gate`)."""
        shared = self.shared_experts
        if shared and (shared[0].positive_prompts or self.gate_mode in RANDOM_MODES):
            return self.experts + shared
        return self.experts

    def models(self) -> list[tuple[str, str]]:
        """(key, reference) of every input model, the base first."""
        return [("base_model", self.base_model),
                *((f"experts.{i}.source_model", e.source_model) for i, e in enumerate(self.experts)),
                *((f"shared_experts.{i}.source_model", e.source_model) for i, e in enumerate(self.shared_experts))]


def is_moe_config(data: Any) -> bool:
    """A mergekit-moe config: `base_model` and `experts`, no `merge_method`."""
    return isinstance(data, Mapping) and "experts" in data and "base_model" in data and "merge_method" not in data


def read_moe_config(path: Path) -> MoEConfig:
    """The config in `path`, checked (see the module's doc)."""

    path = Path(os.path.abspath(path))
    data = read_yaml_file(path, "mergekit-moe config")
    if not isinstance(data, Mapping):
        raise RecipeError(f"{path}: not a mergekit-moe config (expected a mapping with base_model and experts)")
    if "merge_method" in data:
        raise RecipeError(f"{path}: a mergekit-yaml config (merge_method), not a mergekit-moe one",
                          f"run it with `mergecli merge {path.name}`")
    return check_moe_config(dict(data), path)


def check_moe_config(data: dict[str, Any], path: Path) -> MoEConfig:
    unknown = [k for k in data if k not in KEYS]
    if unknown:
        raise RecipeError(f"{unknown[0]}: not a mergekit-moe config key (mergekit would ignore it)",
                          f"the keys are {', '.join(KEYS)}")
    base = _reference(data.get("base_model"), "base_model")
    experts = _experts(data.get("experts"), "experts", required=True)
    shared = _experts(data.get("shared_experts"), "shared_experts", required=False)
    mode = data.get("gate_mode", "hidden")
    if mode not in GATE_MODES:
        raise RecipeError(f"gate_mode: {mode!r} is not one of {', '.join(GATE_MODES)}")
    dtype = data.get("dtype")
    if dtype is not None:
        dtype = str(dtype).removeprefix("torch.")
        if dtype not in DTYPES:
            raise RecipeError(f"dtype: {data['dtype']!r} is not one of {', '.join(DTYPES)}")
    per_token = data.get("experts_per_token", 2)
    if isinstance(per_token, bool) or not isinstance(per_token, int):
        raise RecipeError(f"experts_per_token: {per_token!r} is not a whole number")
    # mergekit's is_bad_config, in its order
    if per_token < 1:
        raise RecipeError(f"experts_per_token: {per_token} must be at least 1")
    if len(experts) < per_token:
        raise RecipeError(f"experts: {len(experts)} expert(s) for experts_per_token {per_token}; "
                          "there must be at least as many experts")
    if mode != "random":  # mergekit asks prompts of uniform_random too
        for i, expert in enumerate(experts):
            if not expert.positive_prompts:
                raise RecipeError(f"experts.{i}.positive_prompts: gate_mode {mode} needs prompts for every expert",
                                  "give each expert prompts of what it should receive, or use gate_mode: random")
        first = (experts[0].positive_prompts, experts[0].negative_prompts)
        if all((e.positive_prompts, e.negative_prompts) == first for e in experts[1:]):
            raise RecipeError("experts: every expert has the same positive and negative prompts; the router "
                              "could not tell them apart", "give each expert prompts of what it should receive")
    if all(e.source_model == experts[0].source_model for e in experts[1:]):
        raise RecipeError("experts: every expert is the same model; the mixture would compute what that model "
                          "computes, at a higher cost")
    output = _output(data.get("architecture"), shared, mode)
    return MoEConfig(path, base, experts, mode, dtype, per_token, shared, output, data)


def _output(architecture: Any, shared: tuple[Expert, ...], mode: str) -> str:
    """The output architecture mergekit 0.1.5 selects: Mixtral unless there is a shared expert;
    with one, Qwen MoE where its router can be built (prompts, or random gates) -- mergekit would
    pick DeepSeek MoE (custom code) otherwise, and for random gates without prompts unless
    `architecture: qwen` asks."""
    if shared and any(bool(e.positive_prompts) != bool(shared[0].positive_prompts) for e in shared):
        raise RecipeError("shared_experts: give prompts to every shared expert or to none")
    if architecture is not None:
        wanted = str(architecture).lower()
        named = [kind for kind, name in OUTPUT_NAMES.items() if name.lower().startswith(wanted)]
        if not named:
            raise RecipeError(f"architecture: {architecture!r} is not an output mergecli builds",
                              "use mixtral, or qwen (Qwen2-MoE, one shared expert); DeepSeek MoE needs custom "
                              "code and Qwen3 MoE is not supported yet")
    else:
        named = list(OUTPUT_NAMES)
    if not shared:
        if MIXTRAL not in named:
            raise RecipeError("architecture: Qwen MoE needs exactly one shared expert (shared_experts)")
        return MIXTRAL
    if MIXTRAL in named and QWEN2_MOE not in named:
        raise RecipeError("shared_experts: Mixtral has no shared experts", "remove them, or use architecture: qwen")
    if len(shared) != 1:
        raise RecipeError(f"shared_experts: {len(shared)} given; Qwen2-MoE has exactly one")
    if shared[0].positive_prompts:
        return QWEN2_MOE
    if mode == "random" and architecture is not None:
        return QWEN2_MOE
    raise RecipeError("shared_experts.0.positive_prompts: without prompts mergekit builds a DeepSeek MoE "
                      "(custom code), which mergecli does not",
                      "give the shared expert prompts (or gate_mode: random with architecture: qwen)")


def _reference(value: Any, key: str) -> str:
    if isinstance(value, Mapping):
        raise RecipeError(f"{key}: give the model as a path or hub id (a mapping is not supported by mergecli)")
    if not isinstance(value, str) or not value.strip():
        raise RecipeError(f"{key}: expected a model path or hub id, got {value!r}")
    if "+" in value:
        raise RecipeError(f"{key}: {value!r}: model+LoRA references are not supported by mergecli moe",
                          "merge the adapter into its model first")
    return value


def _prompts(value: Any, key: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise RecipeError(f"{key}: expected a list of strings")
    return tuple(value)


def _experts(value: Any, key: str, required: bool) -> tuple[Expert, ...]:
    if value is None and not required:
        return ()
    if not isinstance(value, list) or (required and not value):
        raise RecipeError(f"{key}: expected a list of experts (each with source_model and prompts)")
    found = []
    for i, entry in enumerate(value):
        where = f"{key}.{i}"
        if not isinstance(entry, Mapping):
            raise RecipeError(f"{where}: expected a mapping with source_model")
        unknown = [k for k in entry if k not in EXPERT_KEYS]
        if unknown:
            raise RecipeError(f"{where}.{unknown[0]}: not a mergekit-moe expert key (mergekit would ignore it)")
        if entry.get("noise_scale") is not None:
            raise RecipeError(f"{where}.noise_scale: not supported by mergecli (mergekit adds noise drawn from its "
                              "global random generator, which cannot be reproduced)")
        scale = entry.get("residual_scale")
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
            raise RecipeError(f"{where}.residual_scale: {scale!r} is not a number")
        found.append(Expert(_reference(entry.get("source_model"), f"{where}.source_model"),
                            _prompts(entry.get("positive_prompts"), f"{where}.positive_prompts"),
                            _prompts(entry.get("negative_prompts"), f"{where}.negative_prompts"),
                            None if scale is None else float(scale)))
    return tuple(found)
