"""The on-disk workspace: spec-keyed artifacts, a manifest, atomic writes, locks, and garbage
collection that only ever touches what mergecli made.

Every artifact lives in `<root>/<kind>/<key>/`, where `key` hashes its spec (`artifacts.py`). It
is built in a marked temporary folder, its files are fsynced, the folder is renamed into place,
and only then is the manifest entry (each file's size and head digest) written. A reader trusts
an artifact only if the manifest entry exists and its files still match it, so an interrupted or
corrupted artifact is detected and rebuilt, never loaded. Each key has its own lock file, so two
runs never build the same artifact at once; the manifest itself is updated under a short lock.

Ownership: the manifest is validated when read (known kinds only, keys of 20 hex digits, file
names that stay inside their folder); entries that fail are ignored, never acted on. `gc` removes
only manifest entries and marked folders under the known kind folders: a workspace placed in a
folder full of other things leaves every one of them alone.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator

from .artifacts import KEY, ArtifactSpec
from ..errors import MergeCliError, WorkspaceBusyError
from ..fsutil import (OWNER_MARKER, building, content_digest, file_record, folder_bytes, is_owned, leftovers, locked,
                      publish, real, record_problem)

MANIFEST_FORMAT = 3
ROLE = "workspace artifact"  # the marker inside every artifact folder


@dataclass(frozen=True)
class Artifact:
    kind: str
    key: str
    path: Path
    label: str
    spec: dict[str, Any]
    files: dict[str, dict[str, Any]]
    created: float

    @property
    def size(self) -> int:
        return sum(int(f.get("size", 0)) for f in self.files.values())


class Workspace:
    def __init__(self, root: Path, wait: bool = True, log: Callable[[str], None] | None = None) -> None:
        self.root = Path(root)
        self.wait = wait
        self.log = log or (lambda message: None)
        self._warned = False

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    # -- manifest ---------------------------------------------------------------------------
    def _read_manifest(self) -> dict[str, Any]:
        empty: dict[str, Any] = {"format": MANIFEST_FORMAT, "entries": {}}
        if not self.manifest_path.is_file():
            return empty
        try:
            manifest = json.loads(self.manifest_path.read_text())
            if not isinstance(manifest, dict) or not isinstance(manifest.get("entries"), dict):
                raise ValueError("not a mapping with 'entries'")
        except (ValueError, OSError, UnicodeDecodeError) as exc:
            self._warn(f"workspace manifest {self.manifest_path} unreadable ({exc}); treating the cache as empty")
            return empty
        return manifest

    def _valid_entries(self) -> dict[str, dict[str, Any]]:
        entries = {}
        for key, entry in self._read_manifest()["entries"].items():
            problem = _entry_problem(key, entry)
            if problem:
                self._warn(f"manifest entry {key!r} ignored ({problem}); mergecli does not act on it")
                continue
            entries[key] = entry
        return entries

    def _warn(self, message: str) -> None:
        if not self._warned:
            self.log(f"[yellow]{message}[/]")
            self._warned = True

    @contextmanager
    def _manifest_lock(self) -> Iterator[dict[str, Any]]:
        self.root.mkdir(parents=True, exist_ok=True)
        with locked(self.root / ".manifest.lock"):
            manifest = self._read_manifest()
            yield manifest
            tmp = self.manifest_path.with_name(f".manifest.{uuid.uuid4().hex}.tmp")
            tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
            os.replace(tmp, self.manifest_path)

    # -- report files (compare --output/--plot) ----------------------------------------------
    def wrote_report(self, path: Path) -> None:
        """Remember a report file this workspace's stage wrote (real path -> whole-file digest), so
        a rerun may replace it -- and only while it is byte for byte what was written."""
        with self._manifest_lock() as manifest:
            reports = manifest.get("reports") if isinstance(manifest.get("reports"), dict) else {}
            reports[str(real(path))] = content_digest(path)
            manifest["reports"] = reports

    def owns_report(self, path: Path) -> bool:
        """Whether `path` is a report file mergecli wrote here and nobody has changed since."""
        reports = self._read_manifest().get("reports")
        recorded = reports.get(str(real(path))) if isinstance(reports, dict) else None
        return (isinstance(recorded, str) and path.is_file() and not path.is_symlink()
                and content_digest(path) == recorded)

    def artifacts(self) -> list[Artifact]:
        return [self._artifact(key, e) for key, e in self._valid_entries().items()]

    def _artifact(self, key: str, entry: dict[str, Any]) -> Artifact:
        return Artifact(entry["kind"], key, self.root / entry["kind"] / key, str(entry.get("label", "")),
                        entry.get("spec", {}), entry["files"], float(entry.get("created", 0.0)))

    # -- lookup -----------------------------------------------------------------------------
    def find(self, spec: ArtifactSpec) -> Artifact | None:
        """The valid artifact for this spec, or None (a damaged one is reported and dropped)."""
        key = spec.key()
        entry = self._valid_entries().get(key)
        if entry is None or entry["kind"] != spec.kind:
            return None
        artifact = self._artifact(key, entry)
        if artifact.path.is_symlink():
            raise MergeCliError(f"{artifact.path} is a symbolic link; mergecli neither follows nor removes links "
                                "in its workspace", "remove the link, then rerun")
        problem = self.verify(artifact)
        if problem:
            self.log(f"[yellow]cache entry {spec.kind}/{key} ({artifact.label}) is damaged: {problem}; rebuilding[/]")
            self.remove(key)
            return None
        return artifact

    @staticmethod
    def verify(artifact: Artifact) -> str | None:
        """Why an artifact's files no longer match its manifest entry, or None."""
        if artifact.path.is_symlink() or not artifact.path.is_dir():
            return "its folder is missing"
        return next((p for p in (record_problem(artifact.path, n, r) for n, r in artifact.files.items()) if p), None)

    # -- production -------------------------------------------------------------------------
    @contextmanager
    def lock(self, key: str) -> Iterator[None]:
        """Exclusive lock on one artifact key; waits (saying so) or fails, per `self.wait`."""
        try:
            with locked(self.root / "locks" / f"{key}.lock", self.wait,
                        lambda: self.log(f"another run is building {key}; waiting for it to finish")):
                yield
        except BlockingIOError:
            raise WorkspaceBusyError(f"another run is building {key} in {self.root}",
                                     "wait for it, or rerun with --wait") from None

    @contextmanager
    def reserve(self, specs: list[ArtifactSpec]) -> Iterator[list[Artifact | None]]:
        """Each spec's valid artifact, or None for the missing ones, which stay locked until the
        block ends (taken in key order, so two runs never wait on each other in a circle) and are
        looked up again once locked: another run may have built them meanwhile."""
        found = [self.find(spec) for spec in specs]
        with ExitStack() as locks:
            for key in sorted({spec.key() for spec, artifact in zip(specs, found) if artifact is None}):
                locks.enter_context(self.lock(key))
            yield [artifact or self.find(spec) for spec, artifact in zip(specs, found)]

    def get_or_build(self, spec: ArtifactSpec, label: str,
                     produce: Callable[[Path], None]) -> tuple[Artifact, bool]:
        """The artifact for `spec`, built by `produce(folder)` unless cached; (artifact, reused)."""
        with self.reserve([spec]) as (found,):
            if found:
                return found, True
            self.record(spec, label, self.build_folder(spec, produce))
        return self.built(spec), False

    def built(self, spec: ArtifactSpec) -> Artifact:
        """The artifact just recorded for `spec` (checked like any other)."""
        artifact = self.find(spec)
        if artifact is None:
            raise MergeCliError(f"artifact {spec.kind}/{spec.key()} vanished right after it was written")
        return artifact

    def build_folder(self, spec: ArtifactSpec, produce: Callable[[Path], None]) -> dict[str, dict[str, Any]]:
        """Fill a temporary folder with `produce`, then rename it into place; its file records.
        The caller holds the key's lock (or, in a torchrun job, rank 0 holds it on its behalf)
        and `record`s the records, which makes the artifact trusted."""
        final = self.root / spec.kind / spec.key()
        with building(final, ROLE) as tmp:
            produce(tmp)
            files = {p.relative_to(tmp).as_posix(): file_record(p) for p in sorted(tmp.rglob("*"))
                     if p.is_file() and p.name != OWNER_MARKER}
            publish(tmp, final, owned=lambda f: is_owned(f, ROLE))
        return files

    def record(self, spec: ArtifactSpec, label: str, files: dict[str, dict[str, Any]]) -> None:
        """Enter a published artifact in the manifest."""
        with self._manifest_lock() as manifest:
            manifest["entries"][spec.key()] = {"kind": spec.kind, "label": label, "spec": spec.model_dump(mode="json"),
                                               "files": files, "created": time.time()}

    def remove(self, key: str) -> None:
        with self._manifest_lock() as manifest:
            entry = manifest["entries"].pop(key, None)
        if isinstance(entry, dict) and _entry_problem(key, entry) is None:
            folder = self.root / entry["kind"] / key
            if is_owned(folder, ROLE):
                shutil.rmtree(folder, ignore_errors=True)

    # -- garbage ------------------------------------------------------------------------------
    def garbage(self, keep: set[str]) -> list[Path]:
        """What `collect` would remove: artifacts no recipe uses, folders of ours the manifest lost
        track of (a run killed between rename and manifest write), temp folders of killed runs.
        Only marked folders under known kind folders qualify; links are never followed."""
        if not self.root.is_dir():
            return []
        entries = self._valid_entries()
        found = [self.root / e["kind"] / key for key, e in entries.items() if key not in keep]
        for kind in ArtifactSpec.kinds():
            folder = self.root / kind
            if not folder.is_dir() or folder.is_symlink():
                continue
            found += [p for p in folder.iterdir() if KEY.match(p.name) and p.name not in entries and is_owned(p, ROLE)]
            found += [p for p in leftovers(folder, ROLE) if not self._being_built(p)]
        return sorted(p for p in set(found) if is_owned(p, ROLE))

    def collect(self, keep: set[str]) -> tuple[int, int]:
        """Remove garbage; returns (folders removed, bytes freed)."""
        freed = count = 0
        for folder in self.garbage(keep):
            freed += folder_bytes(folder)
            count += 1
            if KEY.match(folder.name):
                self.remove(folder.name)
            shutil.rmtree(folder, ignore_errors=True)
        return count, freed

    def _being_built(self, tmp: Path) -> bool:
        """A temp folder is live while its key's lock is held by another process."""
        key = tmp.name.lstrip(".").split(".")[0]
        lock_path = self.root / "locks" / f"{key}.lock"
        if not lock_path.exists():
            return False
        try:
            with locked(lock_path, wait=False):
                return False
        except BlockingIOError:
            return True


def _entry_problem(key: str, entry: Any) -> str | None:
    """Why a manifest entry cannot be trusted, or None: only known kinds, well-formed keys and file
    names that stay inside the artifact's folder are ever used to build a path."""
    if not isinstance(key, str) or not KEY.match(key):
        return "not a mergecli key"
    if not isinstance(entry, dict):
        return "not a mapping"
    if entry.get("kind") not in ArtifactSpec.kinds():
        return f"unknown kind {entry.get('kind')!r}"
    files = entry.get("files")
    if not isinstance(files, dict) or not all(isinstance(r, dict) for r in files.values()):
        return "no file records"
    for name in files:
        parts = PurePosixPath(name).parts
        if not isinstance(name, str) or not parts or name.startswith("/") or ".." in parts:
            return f"file name {name!r} leaves its folder"
    return None
