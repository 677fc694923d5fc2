"""mergecli: merge fine-tuned language models, stage by stage, from a YAML recipe.

The Python API mirrors the CLI::

    from mergecli import load_recipe, run_taskvec, run_merge
    recipe = load_recipe("recipe.yaml", ["density=0.3"])
    results = run_merge(recipe)
"""

__version__ = "0.1.0"

from .api import MergeResult, Recipe, TaskVector, load_recipe, run_merge, run_taskvec  # noqa: E402

__all__ = ["MergeResult", "Recipe", "TaskVector", "load_recipe", "run_merge", "run_taskvec", "__version__"]
