"""The recipe's schema: what a recipe may say, checked field by field, and its resolved views.

The recipe is the single source of truth for a run (as in torchtune): every stage reads the same
validated object, and validation runs before any model is opened, so a typo costs a second, not a
half-finished merge. Relative paths are resolved against the recipe file, not the shell's cwd
(reading, overriding and validating a file: `load.py`).

A merge variant's method parameters are not fields of this schema: each method declares its own
(`methods/table.py`), and a variant is checked against its method's declaration, so a new method
with a new parameter needs no change here. Fields that only steer how a result is computed, not
what it is (batch sizes, where the workspace lives), are marked `runtime`; every other field is
part of the cache key of whatever it reaches (see `key_view`), so a new field cannot be forgotten.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, StringConstraints, field_validator,
                      model_validator)

from ..errors import RecipeError
from ..methods.settings import settings_of
from ..methods.table import AUTO, LEARNED, WEIGHT, Method, catalog
from ..models.reference import resolve_reference

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
SAFE_NAME = r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,99}$"
SafeName = Annotated[str, StringConstraints(pattern=SAFE_NAME)]
NAME_RULE = "1-100 characters: letters, digits, '.', '_', '+', '-', starting with a letter or digit"


def runtime(default: Any, description: str, **constraints: Any) -> Any:
    """A field that changes how a result is computed, not the result: left out of cache keys."""
    return Field(default, description=description, json_schema_extra={"runtime": True}, **constraints)


def parse_size(text: str | int) -> int:
    """'2GB', '500MiB' or a byte count -> bytes."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError(f"not a size: {text!r} (use e.g. '2GB' or '500MiB')")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])


def default_model_name(ref: str) -> str:
    """A fine-tune's name when the recipe gives none: the last component of its path or hub id."""
    return Path(ref.split("@")[0].rstrip("/")).name


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)


class DatasetSpec(_Strict):
    """Where a fine-tune's own text lives (calibration and evaluation)."""

    path: str = Field(min_length=1, description="hub dataset name, a loader name (json, csv, text, parquet) "
                                                "or a local file/folder")
    name: str | None = Field(None, description="dataset config name")
    data_files: str | list[str] | None = None
    split: str = "train"
    text_field: str = "text"
    messages_field: str | None = Field(None, description="column of chat messages, rendered with the chat template")
    eval_split: str | None = Field(None, description="split for perplexity (default: hold out the end of `split`)")
    holdout: float = Field(0.1, gt=0.0, lt=1.0, description="fraction of `split` kept for evaluation only")


class LmEvalSpec(_Strict):
    """lm-evaluation-harness tasks run on every model (optional extra `mergecli[lmeval]`)."""

    tasks: list[str] = Field(min_length=1)
    include_path: str | None = Field(None, description="folder of custom task YAMLs (relative to the recipe)")
    num_fewshot: int | None = Field(None, ge=0, le=1000)
    limit: int | None = Field(None, ge=1, description="examples per task (for quick checks)")
    batch_size: int = Field(4, ge=1, le=100_000)


class EvaluationSpec(_Strict):
    """Perplexity windows: the same seeded set for every model."""

    samples: int = Field(32, ge=1, le=1_000_000)
    seq_len: int = Field(256, ge=2, le=1_000_000)
    batch_size: int = runtime(4, "windows per forward pass", ge=1, le=100_000)
    seed: int = Field(0, ge=0, lt=2**63)
    datasets: dict[SafeName, DatasetSpec] = Field(default_factory=dict, description="extra eval datasets by name")
    lm_eval: LmEvalSpec | None = None


class CalibrationSpec(_Strict):
    """How calibration windows are drawn for the hessian stage."""

    samples: int = Field(128, ge=1, le=1_000_000)
    seq_len: int = Field(512, ge=2, le=1_000_000)
    batch_size: int = runtime(4, "windows per forward pass", ge=1, le=100_000)
    seed: int = Field(0, ge=0, lt=2**63)
    source: Literal["finetune", "base"] = Field("finetune", description="model whose activations are collected")
    pack: bool = Field(True, description="full windows spread one per document, short documents packed "
                                         "(else one padded window per document)")
    layer_by_layer: bool = runtime(False, "one decoder block on the device at a time")
    general: DatasetSpec | None = Field(None, description="text no fine-tune trained on that `lambda: learned` "
                                        "must not forget (its calibration part); default: text the base samples")


class ModelSpec(_Strict):
    """A fine-tuned model: full checkpoint or LoRA adapter, local folder or hub id[@revision]."""

    name: str = Field("", description="default: the last component of `model`")
    model: str = Field(min_length=1, description="local folder, or hub id with optional @revision")
    weight: Any = Field(1.0, description="a number, or a gradient / filter list (per tensor)")
    dataset: DatasetSpec | None = None
    check_base: bool = Field(True, description="LoRA only: require the adapter's recorded base to match")

    @model_validator(mode="after")
    def _default_name(self) -> "ModelSpec":
        self.weight = WEIGHT.check(self.weight)
        if "name" in self.model_fields_set and not self.name:
            raise ValueError(f"name: must not be empty ({NAME_RULE})")
        self.name = self.name or default_model_name(self.model)
        if not re.match(SAFE_NAME, self.name):
            raise ValueError(f"name: {self.name!r} is not a usable name ({NAME_RULE})")
        return self


class VariantModel(BaseModel):
    """A fine-tune in one variant, with parameters of its own (mergekit's per-model `parameters`)."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    name: str


class MergeSpec(BaseModel):
    """One merge variant: the method, its parameters (declared by the method), and its inputs."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, allow_inf_nan=False)
    name: SafeName
    method: str
    models: list[str | VariantModel] | None = Field(None, min_length=1,
                                                    description="fine-tunes to merge (default: all)")
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    overflow: Literal["error", "clamp"] = Field(
        "error", description="values beyond the output dtype's range: an error naming the tensor, or clamped")
    output: Literal["model", "lora"] = Field("model", description="a full model folder, or a peft LoRA adapter "
                                                                  "of the base (the merged change, SVD-truncated)")
    rank: int | None = Field(None, ge=1, le=65536, description="output: lora only: the adapter's rank")

    @model_validator(mode="after")
    def _lora_rank(self) -> "MergeSpec":
        if self.output == "lora" and self.rank is None:
            raise ValueError("rank: required with output: lora (the adapter's rank, e.g. 16)")
        if self.output != "lora" and self.rank is not None:
            raise ValueError("rank: only with output: lora")
        return self

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        known = catalog()
        if value in RENAMED:
            raise ValueError(RENAMED[value])
        if value not in known:
            raise ValueError(f"unknown method {value!r}{did_you_mean(value, known)}; known: {', '.join(known)}")
        return value

    @model_validator(mode="after")
    def _method_params(self) -> "MergeSpec":
        method = catalog()[self.method]
        given = dict(self.__pydantic_extra__ or {})
        self.__pydantic_extra__ = {p.name: p.check(given.pop(p.name, p.default)) for p in method.params}
        if given:
            field = next(iter(given))
            names = [p.name for p in method.params] + list(MergeSpec.model_fields)
            raise ValueError(f"{field}: unknown field{did_you_mean(field, names)} "
                             f"({self.method} takes: {', '.join(p.name for p in method.params) or 'no parameters'})"
                             f"{_former_meaning(self.method, given)}")
        for i, entry in enumerate(self.models or []):
            if isinstance(entry, VariantModel):
                allowed = {"weight"} | {p.name for p in method.params if p.per_model}
                for key, value in (entry.__pydantic_extra__ or {}).items():
                    if key not in allowed:
                        raise ValueError(f"models.{i}.{key}: not a per-model parameter of {self.method} "
                                         f"(per model: {', '.join(sorted(allowed))})"
                                         f"{_former_meaning(self.method, {key: value})}")
                    entry.__pydantic_extra__[key] = (method.param(key) or WEIGHT).check(value, f"models.{i}.{key}")
        return self

    @property
    def method_spec(self) -> Method:
        return catalog()[self.method]

    @property
    def params(self) -> dict[str, Any]:
        """The method's parameters, every one of them (defaults filled in)."""
        return dict(self.__pydantic_extra__ or {})

    @property
    def model_names(self) -> list[str] | None:
        return None if self.models is None else [m if isinstance(m, str) else m.name for m in self.models]

    def model_params(self, name: str) -> dict[str, Any]:
        """Parameters this variant sets for one model (its weight, density, ...)."""
        for entry in self.models or []:
            if isinstance(entry, VariantModel) and entry.name == name:
                return dict(entry.__pydantic_extra__ or {})
        return {}

    def with_param(self, name: str, value: Any) -> "MergeSpec":
        """A copy of the variant with one parameter set (the scale a choice settled on)."""
        copy = self.model_copy(deep=True)
        copy.__pydantic_extra__[name] = value
        return copy

    @property
    def searched(self) -> list[str]:
        """Parameters set to `auto` or `learned`: chosen by the merge on the fine-tunes' calibration
        text."""
        return [name for name, value in self.params.items() if value in (AUTO, LEARNED)]

    @property
    def needs_stats(self) -> bool:
        from ..methods.scores import SCORES

        score = self.params.get("score")
        return self.method_spec.needs_stats or (score is not None and SCORES[score].needs_stats)


class Recipe(_Strict):
    """A validated recipe. `root` is the folder relative paths are resolved against."""

    name: str = Field("merge", max_length=200)
    base: str = Field(min_length=1, description="base model: local folder or hub id[@revision]")
    models: list[ModelSpec] = Field(min_length=1)
    merges: list[MergeSpec] = Field(default_factory=list)
    workspace: str = runtime("workspace", "cache folder", min_length=1)
    output_dir: str = runtime("merged", "merged models go to output_dir/<merge name>", min_length=1)
    shard_size: str = "2GB"
    extra_tokens: Literal["error", "base", "union"] = Field(
        "error", description="fine-tunes with added tokens: error, keep the base vocabulary, or add their rows")
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    root: Path = Field(default=Path("."), exclude=True)
    path: Path | None = Field(default=None, exclude=True, description="the recipe file (an input: never written)")

    @field_validator("shard_size")
    @classmethod
    def _size(cls, value: str) -> str:
        if not 1024 <= parse_size(value) <= 10**13:
            raise ValueError("must be between 1KiB and 10TB")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "Recipe":
        _unique([m.name for m in self.models], "models", "model name")
        _unique([m.name for m in self.merges], "merges", "merge name")
        known = {m.name for m in self.models}
        for i, merge in enumerate(self.merges):
            names = merge.model_names or []
            _unique(names, f"merges.{i}.models", "model", key="")
            for j, ref in enumerate(names):
                if ref not in known:
                    raise ValueError(f"merges.{i}.models.{j}: {ref!r} is not a model of this recipe "
                                     f"({', '.join(sorted(known))})")
            settings = settings_of(merge, self.models_of(merge))
            if settings.constant():  # else the merge checks each tensor's values
                try:
                    settings.check(settings.at("", None, 0))
                except ValueError as exc:
                    raise ValueError(f"merges.{i}.{exc}") from None
            if merge.params.get("lambda") == LEARNED and not merge.method_spec.additive:
                additive = ", ".join(sorted(n for n, m in catalog().items() if m.additive))
                raise ValueError(f"merges.{i}.lambda: learned scales each fine-tune's part of the merge, and "
                                 f"{merge.method} is not a sum of such parts; use auto, or one of: {additive}")
            if merge.needs_stats or merge.searched:
                why = (f"{merge.method}/{merge.params.get('score')} uses calibration statistics" if merge.needs_stats
                       else f"lambda: {merge.params['lambda']} is chosen on calibration text")
                for j, model in enumerate(self.models):
                    if model.dataset is None and (merge.models is None or model.name in names):
                        raise ValueError(f"models.{j}.dataset: required by merge {merge.name!r} ({why})")
        for i, model in enumerate(self.models):
            if model.model.rstrip("/") == self.base.rstrip("/"):
                raise ValueError(f"models.{i}.model: is the base model itself; list only fine-tunes")
        return self

    # -- resolved views ---------------------------------------------------------------------
    def resolve(self, ref: str) -> str:
        """A model/data reference as an absolute path if local, else unchanged (hub id)."""
        return str(resolve_reference(ref, self.root))

    @property
    def workspace_path(self) -> Path:
        return absolute(self.root / Path(self.workspace).expanduser())

    @property
    def output_path(self) -> Path:
        return absolute(self.root / Path(self.output_dir).expanduser())

    @property
    def shard_bytes(self) -> int:
        return parse_size(self.shard_size)

    def merge(self, name: str) -> MergeSpec:
        for merge in self.merges:
            if merge.name == name:
                return merge
        raise RecipeError(f"no merge named {name!r} in the recipe",
                          f"choose one of: {', '.join(m.name for m in self.merges) or '(none)'}")

    def eval_datasets(self) -> dict[str, DatasetSpec]:
        """Every dataset perplexity is measured on: each fine-tune's own, then the extra ones."""
        found = {m.name: m.dataset for m in self.models if m.dataset is not None}
        return {**found, **self.evaluation.datasets}

    def read_datasets(self) -> dict[str, DatasetSpec]:
        """Every dataset a stage reads, by name: the evaluated ones and the text a learned merge is
        held to (what mergecli must never write into)."""
        general = self.calibration.general
        return {**self.eval_datasets(), **({"calibration.general": general} if general is not None else {})}

    def models_of(self, merge: MergeSpec) -> list[ModelSpec]:
        names = merge.model_names
        return [m for m in self.models if names is None or m.name in names]

    def to_yaml(self) -> str:
        """The resolved recipe, as saved beside every output."""
        data = self.model_dump(by_alias=True, exclude_none=True)
        return yaml.safe_dump(data, sort_keys=False)


def key_view(model: BaseModel, exclude: set[str] = frozenset()) -> dict[str, Any]:
    """What of a recipe part reaches a cache key: every field (extras included) except those
    marked `runtime` and those named in `exclude` (they reach the key another way)."""
    data = model.model_dump(mode="json", by_alias=True)
    for name, info in type(model).model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        if name in exclude or (info.alias or name) in exclude or extra.get("runtime") or info.exclude:
            data.pop(info.alias or name, None)
            continue
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            data[info.alias or name] = key_view(value)
    return data


def absolute(path: Path) -> Path:
    import os

    return Path(os.path.abspath(path))


def _unique(names: list[str], field: str, what: str, key: str = ".name") -> None:
    """Names are unique ignoring case: they become folder names, and some file systems ignore case."""
    seen: set[str] = set()
    for i, name in enumerate(names):
        if name.lower() in seen:
            raise ValueError(f"{field}.{i}{key}: duplicate {what} {name!r}")
        seen.add(name.lower())


RENAMED = {"soup": "'soup' is now called 'linear' (mergekit's weighted average); write method: linear"}
"""Former method names: each answers with what to write instead."""

FORMERLY = {"linear": ("task_arithmetic_topk", "is now mergekit's weighted average of the models (formerly soup)")}
"""Names whose method changed: a parameter only the former method took names its new name."""


def _former_meaning(method: str, given: dict[str, Any]) -> str:
    """'; linear is now ...: for the top-k-trimmed task arithmetic write method: task_arithmetic_topk'
    when a parameter of the former method is given (a recipe written for the old meaning)."""
    if method not in FORMERLY:
        return ""
    successor, meaning = FORMERLY[method]
    if not set(given) & {p.name for p in catalog()[successor].params}:
        return ""
    return f"; {method} {meaning}: for the top-k-trimmed task arithmetic write method: {successor}"


def did_you_mean(value: str, choices: Any) -> str:
    close = difflib.get_close_matches(value, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
