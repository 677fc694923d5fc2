"""File-system primitives every writer shares: digests, fsync, real paths, and folders that appear
complete or not at all.

Ownership starts here: a folder mergecli builds is first created under a temporary name with a
marker file inside (`OWNER_MARKER`), so a leftover of a killed run can be recognised as ours and
removed; anything without the marker is never deleted.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import MergeCliError

HEAD_BYTES = 1 << 20
OWNER_MARKER = ".mergecli-owned"
_TMP = re.compile(r"^\.(?P<name>.+)\.(?P<tag>[0-9a-f]{8})\.(?P<state>tmp|old)$")


def head_digest(path: Path) -> str:
    """sha256 of the first MiB: the whole header of any safetensors file we write."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(HEAD_BYTES)).hexdigest()


def file_record(path: Path) -> dict[str, Any]:
    """What a reader checks before trusting a file it did not just write: size and head digest."""
    return {"size": path.stat().st_size, "head_sha256": head_digest(path)}


def record_problem(folder: Path, name: str, record: dict[str, Any]) -> str | None:
    """Why `folder/name` no longer matches its record, or None."""
    path = folder / name
    if path.is_symlink() or not path.is_file():
        return f"{name} is missing"
    size = path.stat().st_size
    if size != record.get("size"):
        return f"{name} has size {size}, expected {record.get('size')}"
    if head_digest(path) != record.get("head_sha256"):
        return f"{name} has changed since it was written"
    return None


RECORDS = ".mergecli-files.json"


def seal(folder: Path) -> dict[str, dict[str, Any]]:
    """Record every file of a finished folder (size + head digest) inside it, for `unsealed`."""
    import json

    records = {p.relative_to(folder).as_posix(): file_record(p) for p in sorted(folder.rglob("*"))
               if p.is_file() and p.name not in (RECORDS, OWNER_MARKER)}
    (folder / RECORDS).write_text(json.dumps(records, indent=1))
    return records


def unsealed(folder: Path) -> str | None:
    """Why a sealed folder can no longer be trusted (a file missing, resized or rewritten), or None."""
    import json

    try:
        records = json.loads((folder / RECORDS).read_text())
    except (OSError, ValueError):
        return "its file list is missing or unreadable"
    if not isinstance(records, dict):
        return "its file list is not a mapping"
    for name, record in records.items():
        problem = record_problem(folder, name, record) if isinstance(record, dict) else f"{name}: bad record"
        if problem:
            return problem
    return None


def content_digest(path: Path) -> str:
    """sha256 of a whole file (datasets: an edit that keeps size and mtime still changes the key)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under `folder` (links not followed)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def real(path: Path | str) -> Path:
    """The path with every symlink resolved; a symlink loop is the user's error, named."""
    try:
        return Path(os.path.realpath(path, strict=False))
    except (OSError, RuntimeError) as exc:
        raise MergeCliError(f"{path}: cannot resolve the path ({exc})") from None


def overlaps(a: Path, b: Path) -> bool:
    """a is b, is inside b, or contains b (real paths)."""
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def is_owned(folder: Path, role: str | None = None) -> bool:
    """A real folder (not a link) carrying mergecli's marker (for `role`, when given: a workspace
    artifact and an output folder are marked differently, so neither is ever taken for the other)."""
    marker = folder / OWNER_MARKER
    if folder.is_symlink() or not folder.is_dir() or marker.is_symlink() or not marker.is_file():
        return False
    try:
        return role is None or marker.read_text() == role
    except (OSError, UnicodeDecodeError):
        return False


def temp_sibling(final: Path) -> Path:
    return final.parent / f".{final.name}.{uuid.uuid4().hex[:8]}.tmp"


def leftovers(parent: Path, role: str, name: str | None = None) -> list[Path]:
    """Temporary folders of killed runs next to `name` (or any) in `parent` that carry our marker."""
    if not parent.is_dir():
        return []
    found = []
    for path in parent.iterdir():
        match = _TMP.match(path.name)
        if match and (name is None or match.group("name") == name) and is_owned(path, role):
            found.append(path)
    return found


@contextmanager
def locked(path: Path, wait: bool = True, on_wait: Callable[[], None] = lambda: None) -> Iterator[None]:
    """An exclusive advisory lock on `path` (created if missing) for one process at a time; with
    `wait=False` a held lock raises BlockingIOError."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                raise
            on_wait()
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def building(final: Path, role: str) -> Iterator[Path]:
    """A temporary folder beside `final`, marked as mergecli's `role`, to fill; removed if the block
    fails. The caller publishes it with `publish` (after its own checks), so nothing half-written
    is ever at `final`."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(final)
    tmp.mkdir()
    (tmp / OWNER_MARKER).write_text(role)
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def publish(tmp: Path, final: Path, owned: Callable[[Path], bool]) -> None:
    """fsync the finished folder and rename it into place; a previous folder there must be ours
    (`owned`): it is moved aside first, then deleted."""
    fsync_tree(tmp)
    old = None
    if final.exists() or final.is_symlink():
        if not owned(final):
            raise MergeCliError(f"{final} exists and was not made by mergecli; it is left untouched")
        old = final.parent / f".{final.name}.{uuid.uuid4().hex[:8]}.old"
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def size_text(n: float) -> str:
    """Bytes as people read them: 512 B, 1.5 KiB, 3.2 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def cache_root() -> Path:
    return Path(os.environ.get("MERGECLI_CACHE", Path.home() / ".cache" / "mergecli"))
