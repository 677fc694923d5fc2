"""The package's version, in the base layer: stamps, cards and `--version` read it without importing
the package's face (which imports every stage)."""

__version__ = "0.2.0"
