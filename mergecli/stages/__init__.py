"""The stages, found by looking: every module of this package that defines `STAGE`."""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache

from .base import Stage


@cache
def stages() -> dict[str, Stage]:
    """Every stage by name, in pipeline order."""
    found = []
    for module in pkgutil.iter_modules(__path__):
        stage = getattr(importlib.import_module(f"{__name__}.{module.name}"), "STAGE", None)
        if isinstance(stage, Stage):
            found.append(stage)
    return {s.name: s for s in sorted(found, key=lambda s: s.order)}
