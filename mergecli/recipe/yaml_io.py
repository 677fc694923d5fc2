"""Reading recipe-sized YAML: every problem is one RecipeError naming the file (and line).

Recipes and mergekit configs are both read here: a key given twice in one mapping is refused
(plain YAML keeps the last silently), and files too large or nested too deeply to be a recipe are
refused before parsing finishes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ..errors import RecipeError

MAX_RECIPE_BYTES = 1 << 20


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML that refuses a key given twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                mark = key_node.start_mark
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice (line {mark.line + 1})", mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def parse_yaml(text: str, source: str, documents: bool = False) -> Any:
    """YAML text -> data, every problem one RecipeError naming the source (and line); with
    `documents`, the list of its documents (`---`-separated; empty ones left out, at least one)."""
    try:
        if documents:
            found = [d for d in yaml.load_all(text, Loader=_UniqueKeyLoader) if d is not None]  # noqa: S506
            return found or [None]
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError(f"{source}: YAML syntax error{where}: {getattr(exc, 'problem', exc)}") from None
    except RecursionError:
        raise RecipeError(f"{source}: nested too deeply to be a recipe") from None


def read_yaml_file(path: Path, what: str = "recipe", documents: bool = False) -> Any:
    """A small YAML file's data (`documents`: the list of its documents): missing, oversized,
    unreadable or malformed files are RecipeErrors."""
    try:
        if path.is_dir():
            raise RecipeError(f"{path} is a folder, not a {what} file")
        if not path.is_file():
            raise RecipeError(f"{what} not found: {path}", "list built-in recipes with `mergecli recipes ls`")
        size = path.stat().st_size
        if size > MAX_RECIPE_BYTES:
            raise RecipeError(f"{path}: {size / 2**20:.1f} MiB is too large for a {what} "
                              f"(limit {MAX_RECIPE_BYTES // 2**20} MiB)")
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"cannot read {what} {path}: {exc}") from None
    return parse_yaml(text, str(path), documents)
