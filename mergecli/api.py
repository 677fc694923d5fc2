"""The public Python API: the same stages the CLI runs."""

from .recipe import Recipe, load_recipe
from .stages.merge import MergeResult, run_merge
from .stages.taskvec import TaskVector, run_taskvec

__all__ = ["MergeResult", "Recipe", "TaskVector", "load_recipe", "run_merge", "run_taskvec"]
