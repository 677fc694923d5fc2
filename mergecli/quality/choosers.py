"""The way each `lambda` value sets a merge's scale (`scales.Chooser`): a number is fixed, `auto`
is one lambda chosen on calibration windows, `learned` a scale per layer module and fine-tune."""

from __future__ import annotations

from typing import Any

from ..methods.table import AUTO, LEARNED
from .scales import Chooser


def chooser_for(value: Any) -> Chooser:
    """The way a `lambda` value asks for (a number, gradient or filter list: fixed)."""
    from .learn import LearnedScales  # start-up time: both import torch, and the CLI builds --help
    from .search import AutoLambda  # from the stages without it

    if value == LEARNED:
        return LearnedScales()
    if value == AUTO:
        return AutoLambda()
    return Chooser()
