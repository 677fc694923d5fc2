"""Where a dataset spec's text lives, and its fingerprint for cache keys.

One function decides which files a spec reads (`dataset_source`), used both to load the text
(`calibration.py`) and to fingerprint it, so the key covers exactly what is read: every local
file's size and content digest, or a hub dataset's revision. Editing calibration or evaluation
text therefore recomputes the Hessians and perplexities made from it.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ..store.artifacts import DataFingerprint
from ..errors import MergeCliError
from ..fsutil import content_digest
from ..models.reference import is_local_reference
from .schema import DatasetSpec, key_view

LOADERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text", ".text": "text"}


def describe_spec(spec: DatasetSpec) -> str:
    return spec.path + (f" ({spec.name})" if spec.name else "") + f" [{spec.split}]"


@dataclass(frozen=True)
class DatasetSource:
    """What `datasets.load_dataset` is called with: a loader or folder or hub name, and the files."""

    path: str
    files: tuple[Path, ...]  # local files read (empty for a hub dataset)
    local: bool
    pass_files: bool = True  # give `files` as data_files (not for a folder: the loader reads it whole)


def dataset_source(spec: DatasetSpec, root: Path) -> DatasetSource:
    if spec.data_files is not None:
        patterns = [spec.data_files] if isinstance(spec.data_files, str) else spec.data_files
        files = []
        for pattern in patterns:
            matched = sorted(glob.glob(os.path.join(str(root), pattern))) or [str(root / pattern)]
            files += [Path(os.path.abspath(m)) for m in matched]
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise MergeCliError(f"dataset {describe_spec(spec)}: data file not found: {missing[0]}")
        return DatasetSource(spec.path, tuple(files), True)
    if not is_local_reference(spec.path, root):
        return DatasetSource(spec.path, (), False, pass_files=False)
    local = Path(os.path.abspath(root / spec.path))
    if local.is_file():
        if local.suffix not in LOADERS:
            raise MergeCliError(f"dataset {local}: unknown file type {local.suffix!r}",
                                f"use one of {', '.join(sorted(LOADERS))} or give path: <loader> with data_files")
        return DatasetSource(LOADERS[local.suffix], (local,), True)
    if local.is_dir():
        files = tuple(sorted(p for p in local.rglob("*") if p.is_file()
                             and not any(part.startswith(".") for part in p.relative_to(local).parts)))
        return DatasetSource(str(local), files, True, pass_files=False)
    if spec.path in LOADERS.values():
        raise MergeCliError(f"dataset {describe_spec(spec)}: the loader {spec.path!r} needs data_files")
    raise MergeCliError(f"dataset {describe_spec(spec)}: no such file or folder {local}")


def fingerprint(spec: DatasetSpec, root: Path) -> DataFingerprint:
    """The dataset as it is now (see the module docstring)."""
    source = dataset_source(spec, root)
    if not source.local:
        return DataFingerprint(spec=key_view(spec), revision=_hub_revision(spec.path))
    return DataFingerprint(spec=key_view(spec), files=tuple(_file_entry(f) for f in source.files))


def _file_entry(path: Path) -> tuple[str, int, str]:
    stat = path.stat()
    return str(path), stat.st_size, _digest(path, stat.st_size, stat.st_mtime_ns, stat.st_ino)


@lru_cache(maxsize=1024)
def _digest(path: Path, size: int, mtime_ns: int, inode: int) -> str:
    """A file's digest, computed once per process for a given (size, mtime, inode)."""
    return content_digest(path)


def _hub_revision(repo_id: str) -> str:
    """The commit of a hub dataset: asked of the hub, else read from the local cache's refs."""
    from huggingface_hub import HfApi, constants

    try:
        return HfApi().dataset_info(repo_id).sha or "unknown"
    except Exception:  # noqa: BLE001 - offline, or no such dataset: fall back to the cache
        ref = Path(constants.HF_HUB_CACHE) / f"datasets--{repo_id.replace('/', '--')}" / "refs" / "main"
        try:
            return ref.read_text().strip()
        except OSError:
            return "unresolved"
