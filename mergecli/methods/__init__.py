"""Merge math: pure functions on tensors, no I/O."""

from .registry import METHODS, Method, TrimParams, merge_tensor, register_method, trim
from .scores import SCORES, Score

__all__ = ["METHODS", "SCORES", "Method", "Score", "TrimParams", "merge_tensor", "register_method", "trim"]
