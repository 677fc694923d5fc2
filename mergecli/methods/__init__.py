"""Merge math: pure functions on tensors, no I/O."""

from .registry import METHODS, Method, NonFiniteTaskVector, TaskTensor, TrimParams, merge_tensor, register_method, trim
from .scores import SCORES, Score

__all__ = ["METHODS", "SCORES", "Method", "NonFiniteTaskVector", "Score", "TaskTensor", "TrimParams", "merge_tensor", "register_method", "trim"]
