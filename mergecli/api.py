"""The public Python API: the same stages the CLI runs."""

from __future__ import annotations

from .progress import SILENT, Reporter
from .recipe import Recipe, load_recipe
from .report import comparison
from .stages.evaluate import Evaluated, run_eval
from .stages.hessian import HessianSet, run_hessian
from .stages.merge import MergeResult, run_merge
from .stages.taskvec import TaskVector, run_taskvec


def compare(recipe: Recipe, reporter: Reporter = SILENT, device: str = "cpu") -> dict[str, dict]:
    """Run every missing stage, then return the comparison keyed by model name (the seed's
    `merge_all_methods()`): perplexity per dataset, mean, change vs the fine-tunes, best merge."""
    return {row["model"]: row for row in comparison(run_eval(recipe, reporter, device=device))}


__all__ = ["Evaluated", "HessianSet", "MergeResult", "Recipe", "TaskVector", "compare", "load_recipe",
           "run_eval", "run_hessian", "run_merge", "run_taskvec"]
