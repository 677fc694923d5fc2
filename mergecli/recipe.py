"""The YAML recipe: schema, validation, command-line overrides and path resolution.

The recipe is the single source of truth for a run (as in torchtune): every stage reads the same
validated object, and validation runs before any model is opened, so a typo costs a second, not a
half-finished merge. Relative paths are resolved against the recipe file, not the shell's cwd.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import RecipeError
from .methods import METHODS, SCORES

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


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
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class DatasetSpec(_Strict):
    """Where a fine-tune's own text lives (calibration and evaluation)."""

    path: str = Field(description="hub dataset name, a loader name (json, csv, text, parquet) or a local file/folder")
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
    num_fewshot: int | None = None
    limit: int | None = Field(None, ge=1, description="examples per task (for quick checks)")
    batch_size: int = Field(4, ge=1)


class EvaluationSpec(_Strict):
    """Perplexity windows: the same seeded set for every model."""

    samples: int = Field(32, ge=1)
    seq_len: int = Field(256, ge=2)
    batch_size: int = Field(4, ge=1)
    seed: int = 0
    datasets: dict[str, DatasetSpec] = Field(default_factory=dict, description="extra eval datasets by name")
    lm_eval: LmEvalSpec | None = None


class CalibrationSpec(_Strict):
    """How calibration windows are drawn for the hessian stage."""

    samples: int = Field(128, ge=1)
    seq_len: int = Field(512, ge=2)
    batch_size: int = Field(4, ge=1)
    seed: int = 0
    source: Literal["finetune", "base"] = Field("finetune", description="model whose activations are collected")
    pack: bool = Field(True, description="pack documents into full windows (else one padded window per document)")
    layer_by_layer: bool = Field(False, description="one decoder block on the device at a time")


class ModelSpec(_Strict):
    """A fine-tuned model: full checkpoint or LoRA adapter, local folder or hub id[@revision]."""

    name: str = ""
    model: str = Field(description="local folder, or hub id with optional @revision")
    weight: float = 1.0
    dataset: DatasetSpec | None = None
    check_base: bool = Field(True, description="LoRA only: require the adapter's recorded base to match")

    @model_validator(mode="after")
    def _default_name(self) -> "ModelSpec":
        self.name = self.name or default_model_name(self.model)
        return self


class MergeSpec(_Strict):
    """One merge variant: the method, how entries are scored and how many are kept."""

    name: str
    method: str
    score: str | None = None
    density: float | None = Field(None, description="fraction of each task vector kept, in (0, 1]")
    lambda_: float = Field(1.0, alias="lambda", description="scale of the merged task vector")
    seed: int = 0
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    topk: Literal["tensor", "row"] = "tensor"
    models: list[str] | None = Field(None, description="names of the fine-tunes to merge (default: all)")
    compensate: bool = Field(False, description="sparsegpt only: OBS error compensation of the kept entries")
    alpha: float = Field(0.9, ge=0.0, le=1.0, description="regmean: G~ = alpha G + (1 - alpha) diag G")
    damp: float = Field(0.01, gt=0.0, description="Hessian damping, relative to mean(diag H)")

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        if value not in METHODS:
            raise ValueError(f"unknown method {value!r}{_did_you_mean(value, METHODS)}; known: {', '.join(METHODS)}")
        return value

    @field_validator("score")
    @classmethod
    def _known_score(cls, value: str | None) -> str | None:
        if value is not None and value not in SCORES:
            raise ValueError(f"unknown score {value!r}{_did_you_mean(value, SCORES)}; known: {', '.join(SCORES)}")
        return value

    @field_validator("density")
    @classmethod
    def _density_range(cls, value: float | None) -> float | None:
        if value is not None and not 0.0 < value <= 1.0:
            raise ValueError(f"must be in (0, 1], got {value}")
        return value

    @model_validator(mode="after")
    def _method_defaults(self) -> "MergeSpec":
        spec = METHODS[self.method]
        if not spec.sparsify:
            if self.density not in (None, 1.0) or self.score is not None:
                raise ValueError(f"{self.method} merges whole task vectors: remove 'density'/'score' "
                                 "or use ties / dare_linear / dare_ties")
            self.density = 1.0
        else:
            self.score = self.score or spec.default_score
            self.density = spec.default_density if self.density is None else self.density
        if self.compensate and (self.score != "sparsegpt" or spec.rescale):
            raise ValueError("compensate: true needs score: sparsegpt with method ties or linear")
        return self

    @property
    def needs_stats(self) -> bool:
        return METHODS[self.method].needs_stats or (self.score is not None and SCORES[self.score].needs_stats)


class Recipe(_Strict):
    """A validated recipe. `root` is the folder relative paths are resolved against."""

    name: str = "merge"
    base: str = Field(description="base model: local folder or hub id[@revision]")
    models: list[ModelSpec] = Field(min_length=1)
    merges: list[MergeSpec] = Field(default_factory=list)
    workspace: str = "workspace"
    output_dir: str = "merged"
    shard_size: str = "2GB"
    extra_tokens: Literal["error", "base", "union"] = Field(
        "error", description="fine-tunes with added tokens: error, keep the base vocabulary, or add their rows")
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    root: Path = Field(default=Path("."), exclude=True)

    @field_validator("shard_size")
    @classmethod
    def _size(cls, value: str) -> str:
        if parse_size(value) < 1024:
            raise ValueError("must be at least 1KiB")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "Recipe":
        _unique([m.name for m in self.models], "models", "model name")
        _unique([m.name for m in self.merges], "merges", "merge name")
        known = {m.name for m in self.models}
        for i, merge in enumerate(self.merges):
            for ref in merge.models or []:
                if ref not in known:
                    raise ValueError(f"merges.{i}.models: {ref!r} is not a model of this recipe "
                                     f"({', '.join(sorted(known))})")
        for merge in self.merges:
            if merge.needs_stats:
                for i, model in enumerate(self.models):
                    if model.dataset is None and (merge.models is None or model.name in merge.models):
                        raise ValueError(f"models.{i}.dataset: required by merge {merge.name!r} "
                                         f"({merge.method}/{merge.score} uses calibration statistics)")
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
        return (self.root / Path(self.workspace).expanduser()).resolve()

    @property
    def output_path(self) -> Path:
        return (self.root / Path(self.output_dir).expanduser()).resolve()

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

    def models_of(self, merge: MergeSpec) -> list[ModelSpec]:
        return [m for m in self.models if merge.models is None or m.name in merge.models]

    def to_yaml(self) -> str:
        """The resolved recipe, as saved beside every output."""
        data = self.model_dump(by_alias=True, exclude_none=True)
        return yaml.safe_dump(data, sort_keys=False)


def _unique(names: list[str], field: str, what: str) -> None:
    seen: set[str] = set()
    for i, name in enumerate(names):
        if name in seen:
            raise ValueError(f"{field}.{i}.name: duplicate {what} {name!r}")
        seen.add(name)


def _did_you_mean(value: str, choices: Any) -> str:
    close = difflib.get_close_matches(value, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def is_local_reference(ref: str, root: Path) -> bool:
    """A reference is local unless it looks like a hub id and no such path exists."""
    if ref.startswith((".", "/", "~")) or (root / Path(ref).expanduser()).exists():
        return True
    return not HUB_ID.match(ref)


def resolve_reference(ref: str, root: Path) -> Path | str:
    if is_local_reference(ref, root):
        return (root / Path(ref).expanduser()).resolve()
    return ref


def recipes_dir() -> Path:
    """Built-in recipes: shipped in the wheel as mergecli/_recipes, or recipes/ in a checkout."""
    here = Path(__file__).resolve().parent
    return next((p for p in (here / "_recipes", here.parent / "recipes") if p.is_dir()), here / "_recipes")


# -- loading ---------------------------------------------------------------------------------
def load_recipe(path: str | Path, overrides: list[str] | None = None, check_paths: bool = True) -> Recipe:
    """Read, override and validate a recipe file; every problem becomes one RecipeError."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe not found: {path}", "list built-in recipes with `mergecli recipes ls`")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError(f"{path}: YAML syntax error{where}: {getattr(exc, 'problem', exc)}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"cannot read recipe {path}: {exc}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping (base, models, merges, ...)")
    for override in overrides or []:
        apply_override(data, override)
    return validate_recipe(data, path.resolve().parent, check_paths=check_paths, source=str(path))


def validate_recipe(data: dict[str, Any], root: Path, check_paths: bool = True, source: str = "recipe") -> Recipe:
    try:
        recipe = Recipe.model_validate({**data, "root": root})
    except ValidationError as exc:
        raise RecipeError(f"{source}: {_first_problem(exc)}") from None
    if check_paths:
        _check_paths(recipe)
    return recipe


def _first_problem(exc: ValidationError) -> str:
    error = exc.errors()[0]
    loc = ".".join(str(p) for p in error["loc"])
    msg = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        field = str(error["loc"][-1])
        model = {"models": ModelSpec, "merges": MergeSpec, "dataset": DatasetSpec,
                 "calibration": CalibrationSpec, "evaluation": EvaluationSpec, "lm_eval": LmEvalSpec}.get(
            next((str(p) for p in reversed(error["loc"][:-1]) if isinstance(p, str)), ""), Recipe)
        names = [f.alias or n for n, f in model.model_fields.items() if n != "root"]
        return f"{loc}: unknown field{_did_you_mean(field, names)}"
    if error["type"] == "missing":
        return f"{loc}: required field is missing"
    if re.match(r"^[\w.]+: ", msg):  # cross-field checks name their own field
        return msg
    extra = len(exc.errors()) - 1
    return f"{loc}: {msg}" + (f" (and {extra} more problem{'s' * (extra > 1)})" if extra else "")


def _check_paths(recipe: Recipe) -> None:
    refs = [("base", recipe.base)] + [(f"models.{i}.model", m.model) for i, m in enumerate(recipe.models)]
    for field, ref in refs:
        resolved = resolve_reference(ref, recipe.root)
        if isinstance(resolved, Path) and not resolved.exists():
            raise RecipeError(f"{field}: path does not exist: {resolved}",
                              "paths are relative to the recipe file; a hub id looks like org/name[@revision]")


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply `a.b.0.c=value` (YAML value) to the raw recipe.

    A list element can be named by index or by its `name` (`merges.ties.density=0.3`); a bare
    field of a merge variant (`density=0.3`) applies to every variant.
    """
    if "=" not in override:
        raise RecipeError(f"override {override!r} is not key=value", "e.g. merges.0.density=0.3")
    key, _, raw = override.partition("=")
    value = yaml.safe_load(raw) if raw else None
    parts = key.strip().split(".")
    if len(parts) == 1 and parts[0] not in Recipe.model_fields and parts[0] in _merge_fields():
        for merge in data.get("merges") or []:
            merge[parts[0]] = value
        return
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            index = _list_index(node, part, key)
            if last:
                node[index] = value
            node = node[index]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise RecipeError(f"override {key!r}: {'.'.join(parts[:i])} is not a mapping or list")


def _merge_fields() -> set[str]:
    return {f.alias or n for n, f in MergeSpec.model_fields.items()}


def _list_index(node: list[Any], part: str, key: str) -> int:
    if part.isdigit():
        if int(part) >= len(node):
            raise RecipeError(f"override {key!r}: index {part} out of range (list has {len(node)} items)")
        return int(part)
    for index, item in enumerate(node):
        if isinstance(item, dict) and (item.get("name") or default_model_name(str(item.get("model", "")))) == part:
            return index
    raise RecipeError(f"override {key!r}: no item named {part!r}")
