"""Multi-stage files: several recipes in one YAML file (`---`-separated documents), later ones
merging earlier ones' merges, run as one plan (`mergecli merge multi.yml`).

A mergekit-multi file is one (mergekit 0.1.5's `scripts/multimerge.py`): each document a mergekit
config with a `name`, at most one without (the final merge, named here after the file); a model
reference (`base_model`, a model, a slice source, a tokenizer source) that is another document's
name means that merge's output. mergekit writes named merges to `--intermediate-dir/<name>` and the
unnamed one to `--out-path`; here every stage is a merge variant like any other, written to
`output_dir/<name>` (`merged/` next to the file) with its cache in the shared workspace. Documents
may also be mergecli recipes, whose merges later documents name the same way.

Stages run in dependency order (a cycle is an error naming it). A stage's reference to an earlier
merge becomes that merge's output folder; the merge stage fingerprints it by the earlier merge's
cache key, so a rerun rebuilds a stage exactly when its own recipe or an input merge's key changed.

Overrides (`key=value`): recipe-wide fields (`workspace`, `output_dir`, `shard_size`, ...) apply to
every stage; `merges.<name>.<field>` to the stage whose merge it names; a bare method parameter to
every stage with a merge that takes it; anything else to the final stage.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import RecipeError
from .mergekit import is_mergekit_config, translate
from .schema import Recipe, absolute

PER_STAGE = {"merges", "models", "base", "name"}
"""Recipe fields an override sets for one stage (the final one, unless it names a merge)."""


@dataclass
class Stages:
    """The documents of a multi-stage file as recipe data (mergekit configs translated), the merge
    names each one defines, and which is the final one."""

    datas: list[dict]
    names: list[list[Any]]
    final: int
    produced: list[dict[str, str]] = field(default_factory=list)  # per stage: reference -> earlier merge
    order: list[int] = field(default_factory=list)  # the order they run in

    def route(self, override: str, takes: Callable[[Any, str], bool]) -> list[int]:
        """The stages one override applies to (see the module's docstring)."""
        parts = override.partition("=")[0].strip().split(".")
        if parts[0] == "merges" and len(parts) > 1 and not parts[1].isdigit():
            return [next((i for i, found in enumerate(self.names) if parts[1] in found), self.final)]
        if len(parts) == 1 and parts[0] not in Recipe.model_fields:  # a method parameter: the stages taking it
            takers = [i for i, data in enumerate(self.datas)
                      if any(isinstance(m, dict) and takes(m.get("method"), parts[0]) for m in data.get("merges") or [])]
            return takers or [self.final]
        if parts[0] in Recipe.model_fields and parts[0] not in PER_STAGE:
            return list(range(len(self.datas)))
        return [self.final]

    def link(self, root: Path) -> None:
        """Each reference to another stage's merge replaced by that merge's output folder (after the
        overrides: `output_dir` may have moved), and the order the stages run in."""
        owner = {name: i for i, found in enumerate(self.names) for name in found if isinstance(name, str)}
        depends: list[set[int]] = []
        for index, data in enumerate(self.datas):
            needs, refs = set(), {}
            for holder, key in _references(data):
                ref = holder.get(key)
                if isinstance(ref, str) and ref in owner and owner[ref] != index:
                    output = self.datas[owner[ref]].get("output_dir", Recipe.model_fields["output_dir"].default)
                    folder = str(absolute(root / Path(str(output)).expanduser()) / ref)
                    holder[key] = folder
                    refs[folder] = ref
                    needs.add(owner[ref])
            depends.append(needs)
            self.produced.append(refs)
        self.order = _ordered(depends, [n[0] if n else f"document {i + 1}" for i, n in enumerate(self.names)])
        if self.order[-1] != self.final and not any(self.final in needs for needs in depends):
            self.order.remove(self.final)  # the final merge last, where nothing depends on it
            self.order.append(self.final)


def read_stages(path: Path, documents: list[Any], log: Callable[[str], None]) -> Stages:
    """The documents of a multi-stage file as recipe data, mergekit configs translated (the one
    without a name named after the file); merge names unique across the file."""
    root = absolute(path).parent
    label = re.sub(r"[^A-Za-z0-9._+-]", "-", path.stem).lstrip("._+-") or "final"
    unnamed = [i for i, d in enumerate(documents) if is_mergekit_config(d) and d.get("name") is None]
    if len(unnamed) > 1:
        raise RecipeError(f"{path}: document {unnamed[1] + 1}: a second merge without a name (mergekit-multi takes "
                          "one unnamed, final merge)", "name every merge but the final one")
    datas: list[dict] = []
    for index, document in enumerate(documents):
        where = f"{path}: document {index + 1}"
        if is_mergekit_config(document):
            translation = translate(document, root, root, label=str(document.get("name") or label))
            merge = translation.recipe["merges"][0]["name"]
            for note in translation.notes:
                if not note.startswith("workspace, output_dir"):
                    log(f"stage {merge}: {note}")
            datas.append(translation.recipe)
        elif isinstance(document, dict):
            datas.append(document)
        else:
            raise RecipeError(f"{where}: a stage is a mergekit config or a recipe (a YAML mapping)")
    log(f"{len(datas)} stages; workspace, output_dir: not in mergekit configs; the cache goes to workspace/ and "
        "each merge to merged/<name>/ next to the file (override with workspace=DIR output_dir=DIR)")
    names = [[m.get("name") for m in d.get("merges") or [] if isinstance(m, dict)] for d in datas]
    seen: dict[str, int] = {}
    for index, found in enumerate(names):
        for name in found:
            if isinstance(name, str) and name in seen:
                raise RecipeError(f"{path}: document {index + 1}: merge name {name!r} is document {seen[name] + 1}'s "
                                  "too (names are unique in a multi-stage file, as mergekit's)")
            if isinstance(name, str):
                seen[name] = index
    return Stages(datas, names, unnamed[0] if unnamed else len(datas) - 1)


def _references(data: dict) -> list[tuple[dict, str]]:
    """Where a recipe names models: its base and each model's `model`."""
    found = [(data, "base")]
    for model in data.get("models") or []:
        if isinstance(model, dict):
            found.append((model, "model"))
    return found


def _ordered(depends: list[set[int]], labels: list[str]) -> list[int]:
    """The stages in an order where each comes after those it merges (document order otherwise);
    a cycle is a RecipeError naming it."""
    order: list[int] = []
    state: dict[int, str] = {}

    def visit(index: int, trail: list[int]) -> None:
        if state.get(index) == "done":
            return
        if state.get(index) == "open":
            cycle = trail[trail.index(index):] + [index]
            raise RecipeError("circular dependency between stages: " + " -> ".join(labels[i] for i in cycle))
        state[index] = "open"
        for needed in sorted(depends[index]):
            visit(needed, trail + [index])
        state[index] = "done"
        order.append(index)

    for index in range(len(depends)):
        visit(index, [])
    return order
