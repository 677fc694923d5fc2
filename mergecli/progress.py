"""How stages report progress without knowing who listens (Rich bars in the CLI, nothing in tests)."""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager
from typing import Callable, Iterator, Protocol


class Reporter(Protocol):
    def log(self, message: str) -> None:
        """A line for the user (Rich markup allowed)."""

    def track(self, description: str, total: int) -> AbstractContextManager[Callable[[int], None]]:
        """A progress task; the yielded callable advances it by n."""


class SilentReporter:
    def log(self, message: str) -> None:
        pass

    @contextmanager
    def track(self, description: str, total: int) -> Iterator[Callable[[int], None]]:
        yield lambda n=1: None


SILENT = SilentReporter()
