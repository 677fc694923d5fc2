"""The public Python API: one `run_<stage>` function per stage, generated from the stage list, with
one calling convention: `run_merge(recipe, *, reporter=SILENT, device="cpu", wait=True, dist=SINGLE,
**options)`. Under torchrun, pass `dist=mergecli.distributed.join(device)` to share the work out.
The CLI is a thin layer over the same stages."""

from __future__ import annotations

from typing import Any, Callable

from ..distributed import SINGLE, Group
from ..progress import SILENT, Reporter
from ..recipe.schema import Recipe
from ..recipe.load import load_recipe
from ..stages import stages
from ..stages.base import Context, Stage
from .moe import run_moe


def _runner(stage: Stage) -> Callable[..., Any]:
    def run(recipe: Recipe, *, reporter: Reporter = SILENT, device: str = "cpu", wait: bool = True,
            dist: Group = SINGLE, **options: Any) -> Any:
        return stage.run(Context(recipe, reporter, device, wait, dist), **options)

    run.__name__ = run.__qualname__ = f"run_{stage.name}"
    run.__doc__ = stage.summary
    return run


RUNNERS = {f"run_{stage.name}": _runner(stage) for stage in stages().values()}
globals().update(RUNNERS)


def compare(recipe: Recipe, reporter: Reporter = SILENT, device: str = "cpu") -> dict[str, dict]:
    """Run every missing stage, then return the comparison keyed by model name: perplexity per
    dataset, mean, gain retained, change vs the fine-tunes, best merge."""
    _, rows = stages()["compare"].run(Context(recipe, reporter, device))
    return {row["model"]: row for row in rows}


__all__ = ["Context", "Recipe", "compare", "load_recipe", "run_moe", *RUNNERS]
