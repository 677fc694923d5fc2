"""Workspace artifacts built by the processes of a torchrun job: rank 0 coordinates.

Rank 0 looks every artifact of a step up and locks the missing ones (`Workspace.reserve`); every
rank learns the same answer. Each missing artifact is then built by one rank (`Claim.build`: a
temporary folder, filled, renamed into place), and rank 0 alone enters it in the manifest: its own
at once, the others' when the step settles. So only rank 0 ever takes a workspace lock or writes
the manifest: the per-key locks guard against *other* runs (and work across machines only as far
as `fcntl` does on the shared disk); within a job, collective steps order the work. A process that
dies leaves at most a renamed folder the manifest does not list, which nothing trusts: a rerun
builds it again, `ws gc` removes it.

With one process (no torchrun) the same steps run without any collective.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from ..distributed import Group

if TYPE_CHECKING:
    from .artifacts import ArtifactSpec
    from .workspace import Artifact, Workspace


class Claim:
    """The artifacts of one step: found ones, and missing ones to build (locked by rank 0)."""

    def __init__(self, workspace: "Workspace", group: Group, specs: list["ArtifactSpec"], labels: list[str],
                 found: list["Artifact | None"]) -> None:
        self.workspace = workspace
        self.group = group
        self.specs = specs
        self.labels = labels
        self.found = found
        self._unrecorded: list[tuple[int, dict[str, Any]]] = []

    @property
    def missing(self) -> list[int]:
        return [i for i, artifact in enumerate(self.found) if artifact is None]

    def build(self, index: int, produce: Callable[[Path], None]) -> None:
        """Build missing artifact `index` on this rank (only one rank builds each)."""
        files = self.workspace.build_folder(self.specs[index], produce)
        if self.group.main:
            self.workspace.record(self.specs[index], self.labels[index], files)
        else:
            self._unrecorded.append((index, files))

    def settle(self) -> list[tuple["Artifact", bool]]:
        """Every artifact of the step (built by any rank), with whether it was reused; all ranks
        call this once every missing artifact is built."""
        ws = self.workspace
        built = [item for part in self.group.gather(self._unrecorded) for item in part]

        def record() -> list[tuple["Artifact", bool]]:
            for index, files in built:
                ws.record(self.specs[index], self.labels[index], files)
            return [(artifact, True) if artifact else (ws.built(spec), False)
                    for spec, artifact in zip(self.specs, self.found)]

        return self.group.decide(record)


@contextmanager
def claim(workspace: "Workspace", group: Group, specs: list["ArtifactSpec"], labels: list[str]) -> Iterator[Claim]:
    """The artifacts of `specs`: rank 0 finds them and holds the locks of the missing ones for the
    whole block; every rank gets the same `Claim`."""
    with group.lead(lambda: workspace.reserve(specs)) as found:
        yield Claim(workspace, group, specs, labels, found)


def get_or_build(workspace: "Workspace", group: Group, spec: "ArtifactSpec", label: str,
                 produce: Callable[[Path], None]) -> tuple["Artifact", bool]:
    """One artifact every rank needs, built by rank 0 if missing; (artifact, reused)."""
    if not group.launched:
        return workspace.get_or_build(spec, label, produce)
    with claim(workspace, group, [spec], [label]) as step:
        if step.missing and group.main:
            step.build(0, produce)
        return step.settle()[0]
