"""mergecli: merge fine-tuned language models, stage by stage, from a YAML recipe.

The Python API mirrors the CLI::

    from mergecli import load_recipe, compare
    results = compare(load_recipe("recipe.yaml", ["density=0.3"]))
"""

__version__ = "0.1.0"

from .api import (Evaluated, HessianSet, MergeResult, Recipe, TaskVector, compare, load_recipe,  # noqa: E402
                  run_eval, run_hessian, run_merge, run_taskvec)

__all__ = ["Evaluated", "HessianSet", "MergeResult", "Recipe", "TaskVector", "compare", "load_recipe",
           "run_eval", "run_hessian", "run_merge", "run_taskvec", "__version__"]
