"""Artifact specs: for each kind of result mergecli caches, one typed, frozen description of
everything that determines it, including fingerprints of the files it reads. The cache key is a
hash of the whole spec, so no one lists by hand which input matters and none can be forgotten
(the idea of `datasets`' fingerprints and DVC's stage `deps`).

Each stage declares its spec class next to the code that produces it; subclassing registers the
kind, so the workspace knows every kind (and trusts, lists and collects nothing else).
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

KEY = re.compile(r"^[0-9a-f]{20}$")


class ArtifactSpec(BaseModel):
    """Everything one artifact depends on. `kind` names its folder in the workspace; bump `format`
    when the stored layout or the code's result changes, so old entries stop matching."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: ClassVar[str] = ""
    format: ClassVar[int] = 1
    _kinds: ClassVar[dict[str, type["ArtifactSpec"]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.kind:
            if not re.match(r"^[a-z][a-z0-9_]*$", cls.kind) or cls.kind in ArtifactSpec._kinds:
                raise ValueError(f"artifact kind {cls.kind!r} is not a fresh lowercase name")
            ArtifactSpec._kinds[cls.kind] = cls

    @classmethod
    def kinds(cls) -> dict[str, type["ArtifactSpec"]]:
        """Every kind declared so far: a stage module declares its kinds when it is imported, and
        every entry point (the CLI, the API) imports the stages before it opens a workspace. A kind
        not declared yet is one the workspace neither trusts nor removes."""
        return dict(ArtifactSpec._kinds)

    def key(self) -> str:
        blob = json.dumps({"kind": self.kind, "format": self.format, "spec": self.model_dump(mode="json")},
                          sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:20]


class DataFingerprint(BaseModel):
    """A dataset as it is now: its recipe spec plus each file's size and content digest (or the hub
    revision), so an edited file is a different dataset."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    spec: dict[str, Any]
    files: tuple[tuple[str, int, str], ...] = ()  # (path, size, sha256)
    revision: str | None = None
