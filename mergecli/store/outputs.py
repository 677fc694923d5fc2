"""Output folders (merged models, merged adapters): the user's territory, so mergecli replaces one
only if it made it (its stamp or marker) and it holds no file mergecli did not write.

A merged folder is built under a temporary name and renamed into place, so it appears complete or
not at all; its stamp (`mergecli.json`) records the key it was built for and each file's size and
head digest, and a rerun reuses the folder only if every file still matches.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..errors import MergeCliError
from ..fsutil import OWNER_MARKER, is_owned, leftovers, record_problem

STAMP = "mergecli.json"
ROLE = "merged model"  # the marker inside every output folder


def read_stamp(folder: Path) -> dict | None:
    """The stamp of a folder mergecli wrote, or None (absent, unreadable, or not ours)."""
    try:
        stamp = json.loads((folder / STAMP).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(stamp, dict) and isinstance(stamp.get("files"), (dict, list)) and isinstance(stamp.get("result"), dict)
    return stamp if ok else None


def stamp_problem(folder: Path, stamp: dict) -> str | None:
    files = stamp["files"]
    if not isinstance(files, dict):  # stamps of mergecli 0.1 listed names only
        return "its stamp predates file records"
    return next((p for p in (record_problem(folder, n, r) for n, r in files.items()) if p), None)


def ours(folder: Path) -> bool:
    return not folder.is_symlink() and folder.is_dir() and (is_owned(folder, ROLE) or read_stamp(folder) is not None)


def current(out: Path, key: str, overwrite: bool) -> tuple[dict | None, str | None]:
    """Call under the folder's lock. (its stamped result, None) if `out` was built for `key` and
    every file is intact; else (None, the damage found, if any) with the way cleared: temporary
    folders of killed runs next to it removed, a folder of ours checked replaceable."""
    for stale in leftovers(out.parent, ROLE, out.name):
        shutil.rmtree(stale, ignore_errors=True)
    stamp = read_stamp(out)
    problem = None
    if stamp and stamp.get("key") == key and not overwrite:
        problem = stamp_problem(out, stamp)
        if problem is None:
            return stamp["result"], None
    clear_for(out, stamp)
    return None, problem


def clear_for(out: Path, stamp: dict | None) -> None:
    """Make way for a new version of `out`: nothing there, an empty folder, or a folder of ours that
    holds only files we wrote (they are replaced when the new one is published)."""
    check_replaceable(out, stamp)
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        out.rmdir()


def check_replaceable(out: Path, stamp: dict | None) -> None:
    """Refuse an output folder mergecli may not replace (see the module docstring)."""
    if not (out.exists() or out.is_symlink()) or out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        return
    if not ours(out):
        raise MergeCliError(f"output folder {out} exists and was not written by mergecli; it is left untouched",
                            "remove or rename it, or change output_dir or the merge's name")
    listed = set(stamp["files"]) if stamp else set()
    foreign = sorted(p.name for p in out.iterdir() if p.name not in listed | {STAMP, OWNER_MARKER})
    if foreign:
        raise MergeCliError(f"output folder {out} holds files mergecli did not write ({', '.join(foreign[:3])}"
                            f"{', ...' if len(foreign) > 3 else ''}); it is left untouched",
                            "move those files elsewhere, then rerun")
