"""Merge math: the method table (`table.py`), the per-tensor pipeline (`pipeline.py`) and pure
functions on tensors. Importing this package is cheap (no torch); `catalog()` loads every method."""

from .table import METHODS, Method, Param, catalog, register_method

__all__ = ["METHODS", "Method", "Param", "catalog", "register_method"]
