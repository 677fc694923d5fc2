"""A recipe file as a validated `Recipe`: read, translated (a mergekit config), overridden from
the command line (`key=value`, as torchtune), validated, paths checked; every problem one
RecipeError naming the field.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, ValidationError

from ..errors import RecipeError
from ..methods.table import catalog
from ..models.reference import resolve_reference
from .mergekit import import_config, is_mergekit_config
from .multi import read_stages
from .moe import is_moe_config
from .schema import NAME_RULE, MergeSpec, Recipe, absolute, did_you_mean, default_model_name
from .yaml_io import parse_yaml, read_yaml_file


def recipes_dir() -> Path:
    """Built-in recipes: shipped in the wheel as mergecli/_recipes, or recipes/ in a checkout."""
    package = Path(__file__).resolve().parents[1]
    return next((p for p in (package / "_recipes", package.parent / "recipes") if p.is_dir()), package / "_recipes")


def load_recipe(path: str | Path, overrides: list[str] | None = None, check_paths: bool = True,
                log: Callable[[str], None] | None = None) -> Recipe:
    """Read, override and validate a recipe file; every problem becomes one RecipeError.

    A mergekit config (`merge_method:`) is translated first (`mergekit_config`); `log` gets the
    translation's notes (what was dropped or defaulted, and why)."""
    path = Path(path)
    documents = read_yaml_file(path, documents=True)
    if len(documents) > 1:
        return _load_stages(path, documents, list(overrides or []), check_paths, log or (lambda _: None))
    data = documents[0]
    if is_moe_config(data):
        raise RecipeError(f"{path}: a mergekit-moe config (experts:), not a merge recipe",
                          f"build it with `mergecli moe {path.name}`")
    if is_mergekit_config(data):
        translation = import_config(path, data=data)
        for note in translation.notes:
            (log or (lambda _: None))(note)
        data = translation.recipe
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping (base, models, merges, ...)")
    for override in overrides or []:
        apply_override(data, override)
    return validate_recipe(data, absolute(path).parent, check_paths=check_paths, source=str(path),
                           path=absolute(path))


def _load_stages(path: Path, documents: list[Any], overrides: list[str], check_paths: bool,
                 log: Callable[[str], None]) -> Recipe:
    """A multi-stage file (`multi.py`): the final stage's recipe, the others in `stages`, in the
    order they run."""
    stages = read_stages(path, documents, log)
    for override in overrides:
        for index in stages.route(override, _takes):
            apply_override(stages.datas[index], override)
    root = absolute(path).parent
    stages.link(root)
    recipes = []
    for index in stages.order:
        recipe = validate_recipe(stages.datas[index], root, check_paths=False, source=f"{path}: document {index + 1}",
                                 path=absolute(path))
        recipe.produced = stages.produced[index]
        if check_paths:
            _check_paths(recipe)
        recipes.append(recipe)
    recipes[-1].stages = recipes[:-1]
    return recipes[-1]


def validate_recipe(data: dict[str, Any], root: Path, check_paths: bool = True, source: str = "recipe",
                    path: Path | None = None) -> Recipe:
    try:
        recipe = Recipe.model_validate({**data, "root": root, "path": path})
    except ValidationError as exc:
        raise RecipeError(f"{source}: {_first_problem(exc)}") from None
    if check_paths:
        _check_paths(recipe)
    return recipe


def _first_problem(exc: ValidationError) -> str:
    error = exc.errors()[0]
    loc = [str(p) for p in error["loc"] if str(p) not in ("str", "VariantModel") and not str(p).startswith("function-")]
    where = ".".join(loc)
    msg = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        names = [f.alias or n for n, f in _schema_at(loc[:-1]).model_fields.items() if not f.exclude]
        return f"{where}: unknown field{did_you_mean(loc[-1], names)}"
    if error["type"] == "missing":
        return f"{where}: required field is missing"
    if error["type"] == "string_pattern_mismatch":
        return f"{where}: {error.get('input')!r} is not a usable name ({NAME_RULE})"
    named = re.match(r"^([\w.]+): (.*)$", msg, re.DOTALL)
    if named:  # a validator that names its own field, relative to where it ran
        return f"{where + '.' if where else ''}{named.group(1)}: {named.group(2)}"
    extra = len(exc.errors()) - 1
    return f"{where}: {msg}" + (f" (and {extra} more problem{'s' * (extra > 1)})" if extra else "")


def _schema_at(loc: list[str]) -> type[BaseModel]:
    """The schema class of the recipe part at `loc` (list indexes and mapping keys skipped), read
    off the field annotations: no hand-kept map of field names to classes."""
    import typing

    model: type[BaseModel] = Recipe
    for part in loc:
        field = model.model_fields.get(part)
        if field is None:
            continue
        todo, found = [field.annotation], None
        while todo and found is None:
            kind = todo.pop()
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                found = kind
            todo += typing.get_args(kind)
        model = found or model
    return model


def _check_paths(recipe: Recipe) -> None:
    refs = [("base", recipe.base)] + [(f"models.{i}.model", m.model) for i, m in enumerate(recipe.models)]
    for field, ref in refs:
        if ref in recipe.produced:  # an earlier stage's merge: made before this stage runs
            continue
        try:
            resolved = resolve_reference(ref, recipe.root)
        except ValueError as exc:
            raise RecipeError(f"{field}: {exc}") from None
        if isinstance(resolved, Path) and not resolved.exists():
            raise RecipeError(f"{field}: path does not exist: {resolved}",
                              "paths are relative to the recipe file; a hub id looks like org/name[@revision]")


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply `a.b.0.c=value` (YAML value) to the raw recipe.

    A list element can be named by index or by its `name` (`merges.ties.density=0.3`); a bare
    parameter of a merge method (`density=0.3`) applies to every variant whose method takes it.
    """
    if "=" not in override:
        raise RecipeError(f"override {override!r} is not key=value", "e.g. merges.0.density=0.3")
    key, _, raw = override.partition("=")
    value = parse_yaml(raw, f"override {key!r}") if raw else None
    parts = key.strip().split(".")
    if not all(parts):
        raise RecipeError(f"override {override!r}: empty key component", "e.g. merges.0.density=0.3")
    if len(parts) == 1 and parts[0] not in Recipe.model_fields:
        takers = [m for m in data.get("merges") or [] if isinstance(m, dict) and _takes(m.get("method"), parts[0])]
        if takers:
            for merge in takers:
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


def _takes(method: Any, param: str) -> bool:
    spec = catalog().get(method) if isinstance(method, str) else None
    return param in MergeSpec.model_fields or (spec is not None and spec.param(param) is not None)


def _list_index(node: list[Any], part: str, key: str) -> int:
    if part.isdigit():
        if int(part) >= len(node):
            raise RecipeError(f"override {key!r}: index {part} out of range (list has {len(node)} items)")
        return int(part)
    for index, item in enumerate(node):
        if isinstance(item, dict) and (item.get("name") or default_model_name(str(item.get("model", "")))) == part:
            return index
    raise RecipeError(f"override {key!r}: no item named {part!r}")
