"""The on-disk workspace: content-keyed artifacts, a manifest, atomic writes and locks.

Every artifact lives in `<root>/<kind>/<key>/`, where `key` hashes everything that determines
its content (model fingerprints, parameters, format version). An artifact is built in a
temporary folder, its files are fsynced, then the folder is renamed into place and only then is
the manifest entry (with each file's size and a digest of its header) written. A reader trusts an
artifact only if the manifest entry exists and its files still match it, so an interrupted or
corrupted artifact is detected and rebuilt, never loaded. Each key has its own lock file, so two
runs never build the same artifact at once; the manifest itself is updated under a short lock.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import MergeCliError, WorkspaceBusyError

FORMAT_VERSION = 2
HEADER_DIGEST_BYTES = 1 << 20


def artifact_key(kind: str, inputs: dict[str, Any]) -> str:
    """Stable key of an artifact from the inputs that determine it."""
    blob = json.dumps({"artifact": kind, "format": FORMAT_VERSION, "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _file_record(path: Path) -> dict[str, Any]:
    """Size plus a digest of the first MiB (the whole header of any safetensors file we write)."""
    with open(path, "rb") as f:
        head = hashlib.sha256(f.read(HEADER_DIGEST_BYTES)).hexdigest()
    return {"size": path.stat().st_size, "head_sha256": head}


def fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@dataclass(frozen=True)
class Artifact:
    kind: str
    key: str
    path: Path
    label: str
    inputs: dict[str, Any]
    files: dict[str, dict[str, Any]]
    created: float

    @property
    def size(self) -> int:
        return sum(f["size"] for f in self.files.values())


class Workspace:
    def __init__(self, root: Path, wait: bool = True, log: Callable[[str], None] | None = None) -> None:
        self.root = Path(root)
        self.wait = wait
        self.log = log or (lambda message: None)

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    # -- manifest ---------------------------------------------------------------------------
    def _read_manifest(self) -> dict[str, Any]:
        if not self.manifest_path.is_file():
            return {"format": FORMAT_VERSION, "entries": {}}
        try:
            manifest = json.loads(self.manifest_path.read_text())
            if not isinstance(manifest.get("entries"), dict):
                raise ValueError("no entries")
            return manifest
        except (ValueError, OSError) as exc:
            self.log(f"[yellow]workspace manifest unreadable ({exc}); treating the cache as empty[/]")
            return {"format": FORMAT_VERSION, "entries": {}}

    @contextmanager
    def _manifest_lock(self) -> Iterator[dict[str, Any]]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".manifest.lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            manifest = self._read_manifest()
            yield manifest
            tmp = self.manifest_path.with_name(f".manifest.{uuid.uuid4().hex}.tmp")
            tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
            os.replace(tmp, self.manifest_path)

    def artifacts(self) -> list[Artifact]:
        entries = self._read_manifest()["entries"]
        return [self._artifact(key, e) for key, e in entries.items()]

    def _artifact(self, key: str, entry: dict[str, Any]) -> Artifact:
        return Artifact(entry["kind"], key, self.root / entry["kind"] / key, entry.get("label", ""),
                        entry.get("inputs", {}), entry["files"], entry.get("created", 0.0))

    # -- lookup -----------------------------------------------------------------------------
    def find(self, kind: str, inputs: dict[str, Any]) -> Artifact | None:
        """The valid artifact for these inputs, or None (a damaged one is reported and dropped)."""
        key = artifact_key(kind, inputs)
        entry = self._read_manifest()["entries"].get(key)
        if entry is None:
            return None
        artifact = self._artifact(key, entry)
        problem = self._verify(artifact)
        if problem:
            self.log(f"[yellow]cache entry {kind}/{key} ({artifact.label}) is damaged: {problem}; rebuilding[/]")
            self.remove(key)
            return None
        return artifact

    @staticmethod
    def _verify(artifact: Artifact) -> str | None:
        for name, record in artifact.files.items():
            path = artifact.path / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != record["size"]:
                return f"{name} has size {path.stat().st_size}, expected {record['size']}"
            if _file_record(path)["head_sha256"] != record["head_sha256"]:
                return f"{name} has changed since it was written"
        return None

    # -- production -------------------------------------------------------------------------
    @contextmanager
    def lock(self, key: str) -> Iterator[None]:
        """Exclusive lock on one artifact key; waits (saying so) or fails, per `self.wait`."""
        locks = self.root / "locks"
        locks.mkdir(parents=True, exist_ok=True)
        with open(locks / f"{key}.lock", "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not self.wait:
                    raise WorkspaceBusyError(f"another run is building {key} in {self.root}",
                                             "wait for it, or rerun with --wait") from None
                self.log(f"another run is building {key}; waiting for it to finish")
                fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    @contextmanager
    def build(self, kind: str, inputs: dict[str, Any], label: str) -> Iterator[Path]:
        """Yield a temporary folder to fill; on success it becomes the artifact atomically.

        Call under `lock(key)` after `find` returned None (see `get_or_build`).
        """
        key = artifact_key(kind, inputs)
        final = self.root / kind / key
        tmp = self.root / kind / f".{key}.{uuid.uuid4().hex[:8]}.tmp"
        tmp.mkdir(parents=True)
        try:
            yield tmp
            fsync_tree(tmp)
            files = {p.relative_to(tmp).as_posix(): _file_record(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            with self._manifest_lock() as manifest:
                manifest["entries"][key] = {"kind": kind, "label": label, "inputs": inputs,
                                            "files": files, "created": time.time()}
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def get_or_build(self, kind: str, inputs: dict[str, Any], label: str,
                     produce: Callable[[Path], None]) -> tuple[Artifact, bool]:
        """The artifact for `inputs`, built by `produce(folder)` unless cached; (artifact, reused)."""
        found = self.find(kind, inputs)
        if found:
            return found, True
        key = artifact_key(kind, inputs)
        with self.lock(key):
            found = self.find(kind, inputs)  # another run may have built it while we waited
            if found:
                return found, True
            with self.build(kind, inputs, label) as folder:
                produce(folder)
        built = self.find(kind, inputs)
        if built is None:
            raise MergeCliError(f"artifact {kind}/{key} vanished right after it was written")
        return built, False

    def remove(self, key: str) -> None:
        with self._manifest_lock() as manifest:
            entry = manifest["entries"].pop(key, None)
        if entry is not None:
            shutil.rmtree(self.root / entry["kind"] / key, ignore_errors=True)

    def garbage(self, keep: set[str]) -> list[Path]:
        """Folders not referenced by `keep`: unused artifacts, leftovers of interrupted runs (not
        the temp folder of a build that is still running)."""
        if not self.root.is_dir():
            return []
        known = set(self._read_manifest()["entries"])
        kinds = [p for p in self.root.iterdir() if p.is_dir() and p.name != "locks"]
        return [folder for kind in kinds for folder in kind.iterdir()
                if (folder.name not in keep or folder.name not in known)
                and not (folder.name.endswith(".tmp") and _is_being_built(self, folder))]

    def collect(self, keep: set[str]) -> tuple[int, int]:
        """Remove garbage; returns (folders removed, bytes freed)."""
        freed = count = 0
        for folder in self.garbage(keep):
            freed += sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
            count += 1
            self.remove(folder.name)
            shutil.rmtree(folder, ignore_errors=True)
        return count, freed


def _is_being_built(ws: Workspace, tmp: Path) -> bool:
    """A temp folder is live while its key's lock is held by another process."""
    key = tmp.name.lstrip(".").split(".")[0]
    lock_path = ws.root / "locks" / f"{key}.lock"
    if not lock_path.exists():
        return False
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False
