"""User-facing errors.

Everything a user can cause (a bad recipe, a missing file, mismatched models) is raised as a
`MergeCliError`, which the CLI prints as one line with a hint and no traceback. Anything else is a
bug and keeps its traceback under `--debug`.
"""

from __future__ import annotations


class MergeCliError(Exception):
    """An error the user can fix; `hint` says how."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class UsageError(MergeCliError):
    """The command line asks for something that does not exist (an unknown format, device, built-in
    recipe, no workspace named): exit code 2, like the parser's own usage errors."""

    exit_code = 2


class RecipeError(MergeCliError):
    """The recipe is invalid; raised before any model is opened."""

    exit_code = 2


class ModelMismatchError(MergeCliError):
    """A fine-tune does not fit its base (names, shapes, architecture): the inputs cannot be merged
    as given, like a recipe that cannot; refused before anything is written."""

    exit_code = 2


class WorkspaceBusyError(MergeCliError):
    """Another run holds the lock on the artifact this run wants to write."""

    exit_code = 3
