"""mergecli: merge fine-tuned language models, stage by stage, from a YAML recipe.

The Python API mirrors the CLI (one `run_<stage>` per stage)::

    from mergecli import load_recipe, compare
    results = compare(load_recipe("recipe.yaml", ["density=0.3"]))
"""

from .app import api
from .app.api import *  # noqa: F401,F403
from .version import __version__

__all__ = [*api.__all__, "__version__"]
