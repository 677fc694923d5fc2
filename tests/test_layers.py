"""The package's layers are its folders, and imports only run down them.

Bottom to top: base utilities (the modules at the top of `mergecli/`), then `methods/` (pure math)
and `models/` (files and architectures), `store/`, `recipe/`, `engine/`, `quality/`, `stages/`,
`app/`. A module may import its own layer and the layers below; two folders on one level may not
import each other. Imports inside functions count too (a lazy import does not remove a cycle, it
hides one), so the graph here is every import the code names, read with `ast`, nothing run.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "mergecli"
BASE = {"errors", "progress", "distributed", "fsutil", "version"}
LEVELS = {"methods": 1, "models": 1, "store": 2, "recipe": 3, "engine": 4, "quality": 5, "stages": 6, "app": 7}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> tuple[int, str]:
    """(level, layer name) of a mergecli module."""
    parts = module.split(".")
    if len(parts) == 1:
        return 8, "package"  # mergecli/__init__: the public face, above everything
    if parts[1] in LEVELS:
        return LEVELS[parts[1]], parts[1]
    if parts[1] in BASE:
        return 0, "base"
    if parts[1] == "__main__":
        return 8, "package"
    raise AssertionError(f"{module}: not in any layer (a new top-level module? put it in a layer's folder)")


def imports() -> dict[str, set[str]]:
    """module -> the mergecli modules it imports (anywhere in its code)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    found: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.startswith("mergecli")}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                elif node.module and node.module.startswith("mergecli"):
                    base = node.module
                else:
                    continue
                for alias in node.names:  # `from . import x` names a module when x is one
                    candidate = f"{base}.{alias.name}"
                    targets.add(candidate if candidate in modules else base)
        found[name] = {t for t in targets if t in modules and t != name}
    return found


def test_every_import_runs_down_the_layers():
    upward = []
    for module, targets in imports().items():
        level, own = layer(module)
        for target in targets:
            their_level, theirs = layer(target)
            if their_level > level or (their_level == level and theirs != own and level > 0):
                upward.append(f"{module} -> {target} ({own} imports {theirs})")
    assert not upward, "imports that run up or across the layers:\n" + "\n".join(sorted(upward))


def test_there_is_no_import_circle():
    graph = imports()
    state: dict[str, int] = {}
    circles = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                circles.append(" -> ".join(trail[trail.index(target):] + [target]))
            elif target not in state:
                visit(target, trail + [target])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_the_package_has_no_loose_modules():
    """Every module lives in a layer's folder, except the few base utilities."""
    loose = {p.stem for p in PACKAGE.glob("*.py")} - BASE - {"__init__", "__main__"}
    assert not loose, f"modules outside the layers' folders: {sorted(loose)}"
