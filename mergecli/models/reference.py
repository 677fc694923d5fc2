"""Model references: a recipe string -> a local folder, its kind and a fingerprint for cache keys.

A reference is a local folder, a `.gguf` file (dequantized once, see `gguf.py`) or a hub id with
an optional `@revision`. Hub ids go through
huggingface_hub's own `snapshot_download` (which honours HF_HUB_OFFLINE and the local cache); a
failed look-up becomes one message naming the id. The fingerprint identifies the exact weights:
the commit hash for hub models; for local folders the absolute path plus each weight/config
file's name, size and modification time (the quick check make and rsync use), so rewriting any
file invalidates every artifact derived from it without hashing gigabytes on every run.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..errors import MergeCliError
from ..recipe import resolve_reference

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.bin", "*.model", "*.txt", "*.jinja"]


@dataclass(frozen=True)
class ModelSource:
    ref: str
    path: Path
    kind: Literal["full", "lora"]
    fingerprint: str

    def config(self) -> dict:
        name = "adapter_config.json" if self.kind == "lora" else "config.json"
        return json.loads((self.path / name).read_text())


def resolve_model(ref: str, root: Path) -> ModelSource:
    """Find the model behind a reference (downloading hub ids where the hub is reachable)."""
    location = resolve_reference(ref, root)
    if isinstance(location, Path):
        if location.is_file() and location.suffix == ".gguf":
            from .gguf import gguf_folder

            fingerprint = "gguf:" + _file_fingerprint(location)
            return ModelSource(ref, gguf_folder(location, fingerprint), "full", fingerprint)
        if not location.is_dir():
            raise MergeCliError(f"model path is not a folder: {location}")
        return ModelSource(ref, location, _kind(location), _local_fingerprint(location))
    repo_id, _, revision = ref.partition("@")
    folder = _download(repo_id, revision or None)
    return ModelSource(ref, folder, _kind(folder), f"hub:{repo_id}@{folder.name}")


def tokenizer_folder(*candidates: Path) -> Path:
    """The first folder that holds a tokenizer (a fine-tune often ships none: then the base's)."""
    for folder in candidates:
        if (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file():
            return folder
    raise MergeCliError(f"no tokenizer found in {', '.join(map(str, candidates))}")


def _kind(folder: Path) -> Literal["full", "lora"]:
    if (folder / "adapter_config.json").is_file():
        return "lora"
    if (folder / "config.json").is_file():
        return "full"
    raise MergeCliError(f"{folder}: neither a model (config.json) nor a LoRA adapter (adapter_config.json)")


def _local_fingerprint(folder: Path) -> str:
    digest = hashlib.sha256(str(folder.resolve()).encode())
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix in WEIGHT_SUFFIXES:
            stat = path.stat()
            digest.update(f"\0{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    return "local:" + digest.hexdigest()[:32]


def _file_fingerprint(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:32]


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS))
    except Exception as exc:  # noqa: BLE001 - hub errors come in many classes; all mean "not available"
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MergeCliError(
            f"cannot get {repo_id}{'@' + revision if revision else ''} from the Hugging Face hub: {reason}",
            "check the id and your network, or point the recipe at a local folder",
        ) from None
