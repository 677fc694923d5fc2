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
from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, StringConstraints, ValidationError,
                      field_validator, model_validator)

from ..errors import RecipeError
from ..methods.settings import settings_of
from ..methods.table import AUTO, LEARNED, WEIGHT, Method, catalog
from ..models.reference import resolve_reference
from .chat_templates import BUILT_IN

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


ZERO = "zero"
"""A token's row of zeros (`tokenizer.tokens.<token>.source: zero`)."""


class TokenRow(_Strict):
    """Another token's row in one model: `{model: code, token: "</s>"}` or `{model: code, token_id: 2}`."""

    model: str = Field(min_length=1, description="base or one of the recipe's models")
    token: str | None = None
    token_id: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _one(self) -> "TokenRow":
        if (self.token is None) == (self.token_id is None):
            raise ValueError("token: give token or token_id, one of them")
        return self


class TokenSpec(_Strict):
    """Where one token's row comes from (mergekit's `tokenizer.tokens`)."""

    source: str | TokenRow = Field(description="zero, base, a model's name (its row for this token), or "
                                               "{model, token | token_id} (its row for another token)")
    force: bool = Field(False, description="every model gets this row, even one that has the token")

    @field_validator("source", mode="before")
    @classmethod
    def _source(cls, value: Any) -> Any:
        if isinstance(value, (str, TokenRow)):
            return value
        if isinstance(value, dict):
            try:
                return TokenRow.model_validate(value)
            except ValidationError as exc:
                error = exc.errors()[0]
                where = ".".join(str(p) for p in error["loc"])
                msg = ("unknown field (a row of another token: model, token or token_id)"
                       if error["type"] == "extra_forbidden" else error["msg"].removeprefix("Value error, "))
                raise ValueError(f"{where + ': ' if where else ''}{msg}") from None
        raise ValueError("expected zero, base, a model's name, or {model, token | token_id}")


class TokenizerSpec(_Strict):
    """The merged model's tokenizer: its vocabulary, rows for chosen tokens, a chat template."""

    source: str | None = Field(None, description="base | union | a model's name: the merged vocabulary, every "
                                                 "model's rows re-mapped to it by token (default: the base's files "
                                                 "and rows as they are)")
    tokens: dict[str, TokenSpec] = Field(default_factory=dict, description="rows for chosen tokens (added to the "
                                                                           "vocabulary where it lacks them)")
    pad_to_multiple_of: int | None = Field(None, ge=1, le=1_000_000, description="pad the rows to a multiple (the "
                                                                                "padding rows: each model's mean row)")
    chat_template: str | None = Field(None, description="a built-in name (alpaca, chatml, exaone, llama3, mistral), "
                                                        "auto (the most common among the models) or a Jinja template")

    @model_validator(mode="after")
    def _rules(self) -> "TokenizerSpec":
        if self.source is None and (self.tokens or self.pad_to_multiple_of):
            field = "tokens" if self.tokens else "pad_to_multiple_of"
            raise ValueError(f"{field}: needs a source (base, union or a model's name): rows are re-mapped by token "
                             "only then")
        if self.chat_template is not None:
            chat_template_text(self.chat_template)  # a name it knows, auto, or a template
        return self


def chat_template_text(value: str) -> str | None:
    """A `chat_template` setting as mergekit 0.1.5 reads it: a built-in template's text by name,
    None for `auto` (chosen among the models), else the Jinja template itself; ValueError for a
    string that is neither (mergekit: shorter than 20 characters or without `{`)."""

    if value == "auto":
        return None
    if value in BUILT_IN:
        return BUILT_IN[value]
    if len(value) < 20 or "{" not in value:
        raise ValueError(f"chat_template: {value!r} is neither a built-in template ({', '.join(BUILT_IN)}), auto, "
                         f"nor a Jinja template{did_you_mean(value, BUILT_IN)}")
    return value


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


class BlockModel(VariantModel):
    """A model of a merge block (`layers:`): its own layer range and parameters in that block."""

    range: tuple[int, int] | None = Field(None, description="its layers [first, end) (default: the block's range)")


BASE = "base"
"""What a copy block names to copy the base's own layers (`layers: [{from: base, ...}]`)."""


class LayerBlock(BaseModel):
    """A run of output layers of a layer-stacking variant (`layers:`): copied from one model
    (`from`: mergekit's passthrough), or merged, layer by layer, by a method over the base's
    layers `range` and the models' layers (each its own range, of the same length)."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    range: tuple[int, int] | None = Field(None, description="layers [first, end) of the base (a merge) or of the "
                                                            "copied model (default: all)")
    source: str | None = Field(None, alias="from", description="copy this model's layers as stored: 'base' or the "
                                                               "name of one of the recipe's models")
    method: str | None = Field(None, description="a merge block's method (default: the variant's)")
    models: list[str | BlockModel] | None = Field(None, min_length=1,
                                                  description="a merge block's models (default: the variant's)")

    @field_validator("range")
    @classmethod
    def _range(cls, value: tuple[int, int] | None) -> tuple[int, int] | None:
        if value is not None and not 0 <= value[0] < value[1]:
            raise ValueError(f"layers [first, end) with 0 <= first < end, got {list(value)}")
        return value

    @property
    def params(self) -> dict[str, Any]:
        """What the block sets itself: method parameters (a merge) or `scale` (a copy)."""
        return dict(self.__pydantic_extra__ or {})


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
    layers: list[LayerBlock] | None = Field(None, min_length=1, description="layer stacking: the output's decoder "
                                                                           "layers, block by block (default: the "
                                                                           "base's, each merged)")
    _given: frozenset[str] = PrivateAttr(frozenset())  # the method parameters the recipe sets (not defaulted)

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
        self._given = frozenset(given)
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

    @model_validator(mode="after")
    def _layer_blocks(self) -> "MergeSpec":
        if self.layers is None:
            return self
        if self.output == "lora":
            raise ValueError("layers: a LoRA adapter of the base keeps the base's layers; write output: model")
        searched = [name for name in self.searched]
        if searched:
            raise ValueError(f"{searched[0]}: {self.params[searched[0]]} scores merges of the base's shape; a layer-"
                             "stacking variant takes fixed values")
        for i, block in enumerate(self.layers):
            if block.source is not None:
                if block.method is not None or block.models is not None:
                    raise ValueError(f"layers.{i}.from: a copied block takes no method or models (it is mergekit's "
                                     "passthrough of one model)")
                for key, value in block.params.items():
                    if key != "scale":
                        raise ValueError(f"layers.{i}.{key}: unknown field{did_you_mean(key, ['scale'])} (a copied "
                                         "block takes: range, scale)")
                    block.__pydantic_extra__[key] = _scale().check(value, f"layers.{i}.scale")
                continue
            try:
                spec = self.block_spec(i)
            except ValidationError as exc:
                error = exc.errors()[0]
                where = ".".join(str(p) for p in error["loc"] if str(p) not in ("str", "BlockModel", "VariantModel"))
                raise ValueError(f"layers.{i}.{where + ': ' if where else ''}"
                                 f"{error['msg'].removeprefix('Value error, ')}") from None
            if spec.searched:
                raise ValueError(f"layers.{i}.{spec.searched[0]}: a layer-stacking variant takes fixed values")
            for j, entry in enumerate(block.models or []):
                if isinstance(entry, BlockModel) and entry.range is not None and block.range is not None \
                        and entry.range[1] - entry.range[0] != block.range[1] - block.range[0]:
                    raise ValueError(f"layers.{i}.models.{j}.range: {list(entry.range)} has "
                                     f"{entry.range[1] - entry.range[0]} layers, the block's range "
                                     f"{list(block.range)} {block.range[1] - block.range[0]}")
        return self

    def block_spec(self, index: int) -> "MergeSpec":
        """Merge block `index` of `layers` as a variant of its own: its method (default: the
        variant's), the variant's parameters that method takes, overridden by the block's, and its
        models (default: the variant's, with their own parameters)."""
        block = self.layers[index]
        method = block.method or self.method
        spec = catalog().get(method)
        inherited = {k: v for k, v in self.params.items() if k in self._given and spec and spec.param(k)}
        models = block.models if block.models is not None else self.models
        entries = None if models is None else [
            m if isinstance(m, str) else {"name": m.name, **(m.__pydantic_extra__ or {})} for m in models]
        return MergeSpec.model_validate({"name": self.name, "method": method, "models": entries, "dtype": self.dtype,
                                         "overflow": self.overflow, **inherited, **block.params})

    def block_ranges(self, index: int) -> dict[str, tuple[int, int]]:
        """The models of merge block `index` that give their own layer range, by name."""
        return {m.name: m.range for m in self.layers[index].models or []
                if isinstance(m, BlockModel) and m.range is not None}

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
        from ..methods.scores import SCORES  # start-up time (torch)

        if self.layers is not None:
            return any(self.block_spec(i).needs_stats for i, b in enumerate(self.layers) if b.source is None)
        score = self.params.get("score")
        return self.method_spec.needs_stats or (score is not None and SCORES[score].needs_stats)

    @property
    def merge_blocks(self) -> list["MergeSpec"]:
        """The variant as it merges: itself, or each merge block of `layers` as a variant."""
        if self.layers is None:
            return [self]
        return [self.block_spec(i) for i, block in enumerate(self.layers) if block.source is None]


def _scale() -> Any:
    """passthrough's `scale`, which a copied block takes (methods/passthrough.py imports torch)."""
    return catalog()["passthrough"].param("scale")


class Recipe(_Strict):
    """A validated recipe. `root` is the folder relative paths are resolved against."""

    name: str = Field("merge", max_length=200)
    base: str = Field(min_length=1, description="base model: local folder or hub id[@revision]")
    models: list[ModelSpec] = Field(default_factory=list, description="the fine-tunes (none only when every merge "
                                                                        "copies the base's layers)")
    merges: list[MergeSpec] = Field(default_factory=list)
    workspace: str = runtime("workspace", "cache folder", min_length=1)
    output_dir: str = runtime("merged", "merged models go to output_dir/<merge name>", min_length=1)
    shard_size: str = "2GB"
    extra_tokens: Literal["error", "base", "union"] = Field(
        "error", description="fine-tunes with added tokens: error, keep the base vocabulary, or add their rows")
    tokenizer: TokenizerSpec | None = Field(None, description="the merged vocabulary and chat template (default: "
                                                              "the base's tokenizer files as they are)")
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    root: Path = Field(default=Path("."), exclude=True)
    path: Path | None = Field(default=None, exclude=True, description="the recipe file (an input: never written)")
    # a multi-stage file (`multi.py`): the stages run before this one, in order, and which of this
    # recipe's model references are an earlier stage's merge (reference -> that merge's name)
    stages: list["Recipe"] = Field(default_factory=list, exclude=True)
    produced: dict[str, str] = Field(default_factory=dict, exclude=True)

    @field_validator("shard_size")
    @classmethod
    def _size(cls, value: str) -> str:
        if not 1024 <= parse_size(value) <= 10**13:
            raise ValueError("must be between 1KiB and 10TB")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "Recipe":
        if not self.models and not (self.merges and all(m.layers and not m.merge_blocks for m in self.merges)):
            raise ValueError("models: List should have at least 1 item (only a recipe whose every merge copies the "
                             "base's layers needs no fine-tune)")
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
            for j, block in enumerate(merge.layers or []):
                if block.source is not None and block.source != BASE and block.source not in known:
                    raise ValueError(f"merges.{i}.layers.{j}.from: {block.source!r} is neither base nor a model of "
                                     f"this recipe ({', '.join(sorted(known))})")
                block_names = [m if isinstance(m, str) else m.name for m in block.models or []]
                _unique(block_names, f"merges.{i}.layers.{j}.models", "model", key="")
                for k, ref in enumerate(block_names):
                    if ref not in known:
                        raise ValueError(f"merges.{i}.layers.{j}.models.{k}: {ref!r} is not a model of this recipe "
                                         f"({', '.join(sorted(known))})")
            blocks = [j for j, block in enumerate(merge.layers or [None]) if block is None or block.source is None]
            for j, spec in zip(blocks, merge.merge_blocks):
                where = f"merges.{i}." + (f"layers.{j}." if merge.layers else "")
                settings = settings_of(spec, self.models_of(spec))
                if settings.constant():  # else the merge checks each tensor's values
                    try:
                        settings.check(settings.at("", None, 0))
                    except ValueError as exc:
                        raise ValueError(f"{where}{exc}") from None
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
        if self.tokenizer is not None:
            self._check_tokenizer(self.tokenizer, known)
        if BASE in known and (self.tokenizer is not None or any(m.layers for m in self.merges)):
            index = [m.name for m in self.models].index(BASE)
            raise ValueError(f"models.{index}.name: {BASE!r} names the base model in layers and tokenizer settings; "
                             "give this fine-tune another name")
        return self

    def _check_tokenizer(self, spec: TokenizerSpec, known: set[str]) -> None:
        """Names a tokenizer setting gives are the base or the recipe's models; re-mapping rows by
        token replaces `extra_tokens`."""
        if spec.source is not None and self.extra_tokens != "error":
            raise ValueError("extra_tokens: give tokenizer.source or extra_tokens, not both (tokenizer.source "
                             "re-maps every model's rows by token, added ones included)")
        for i, merge in enumerate(self.merges):
            if merge.output == "lora":
                raise ValueError(f"merges.{i}.output: a LoRA adapter keeps the base's tokenizer; the recipe's "
                                 "tokenizer setting needs output: model")
            if spec.source is not None and merge.searched:
                raise ValueError(f"merges.{i}.{merge.searched[0]}: {merge.params[merge.searched[0]]} scores merges "
                                 "with the base's vocabulary; with tokenizer.source give a fixed value")
        if spec.source not in (None, "base", "union") and spec.source not in known:
            raise ValueError(f"tokenizer.source: {spec.source!r} is neither base, union nor a model of this recipe "
                             f"({', '.join(sorted(known))})")
        for token, rule in spec.tokens.items():
            model = rule.source.model if isinstance(rule.source, TokenRow) else rule.source
            if model not in (ZERO, BASE) and model not in known:
                raise ValueError(f"tokenizer.tokens.{token}.source: {model!r} is neither zero, base nor a model of "
                                 f"this recipe ({', '.join(sorted(known))})")
            if isinstance(rule.source, TokenRow) and rule.source.model == ZERO:
                raise ValueError(f"tokenizer.tokens.{token}.source.model: zero has no rows; write source: zero")

    # -- resolved views ---------------------------------------------------------------------
    @property
    def rows_rule(self) -> str:
        """What a fine-tune's vocabulary rows may be (`taskvectors._check_match`): `extra_tokens`, or
        `vocabulary` when `tokenizer.source` re-maps every model's rows by token (any number)."""
        return "vocabulary" if self.tokenizer is not None and self.tokenizer.source is not None else self.extra_tokens

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
        """The fine-tunes a variant reads, in the recipe's order (a layer-stacking variant: those of
        its blocks, merged or copied)."""
        if merge.layers is not None:
            used = {m.name for spec in merge.merge_blocks for m in self.models_of(spec)}
            used |= {b.source for b in merge.layers if b.source is not None}
            return [m for m in self.models if m.name in used]
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


Recipe.model_rebuild()
