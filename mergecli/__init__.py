"""mergecli: merge fine-tuned language models, stage by stage, from a YAML recipe.

The Python API mirrors the CLI (one `run_<stage>` per stage)::

    from mergecli import load_recipe, compare
    results = compare(load_recipe("recipe.yaml", ["density=0.3"]))
"""

__version__ = "0.2.0"

from . import api  # noqa: E402
from .api import *  # noqa: E402,F401,F403

__all__ = [*api.__all__, "__version__"]
