"""Model references: a recipe string -> a local folder, its kind and a fingerprint for cache keys.

A reference is a local folder, a `.gguf` file (dequantized once, see `gguf.py`) or a hub id with
an optional `@revision`. Hub ids go through huggingface_hub's own `snapshot_download` (which
honours HF_HUB_OFFLINE and the local cache); a failed look-up becomes one message naming the id.
The fingerprint identifies the exact files: the commit hash for hub models; for local folders the
real path plus each file's name, size and modification time (the quick check make and rsync use)
and a digest of the first MiB of each weight file (which holds a safetensors header), so
rewriting any file invalidates every artifact derived from it without hashing gigabytes per run.

Models never run code of their own: a config or tokenizer that asks for custom code (`auto_map`)
is refused here, before transformers could prompt for it.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..errors import MergeCliError
from ..fsutil import head_digest, real
from .gguf import gguf_folder

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.bin", "*.model", "*.txt", "*.jinja"]
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def is_local_reference(ref: str, root: Path) -> bool:
    """A reference is local unless it looks like a hub id and no such path exists."""
    if ref.startswith((".", "/", "~")) or _exists(root / Path(ref).expanduser()):
        return True
    return not HUB_ID.match(ref)


def resolve_reference(ref: str, root: Path) -> Path | str:
    """A local reference as an absolute path (symlinks kept: they are resolved where paths are
    compared), a hub id unchanged."""
    if is_local_reference(ref, root):
        import os

        return Path(os.path.abspath(root / Path(ref).expanduser()))
    return ref


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:
        return False


def read_json(path: Path, what: str = "") -> Any:
    """A JSON file's data; a missing, unreadable or malformed file is one error naming it."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise MergeCliError(f"{path}: file not found{what}") from None
    except json.JSONDecodeError as exc:
        raise MergeCliError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MergeCliError(f"{path}: cannot read ({exc})") from None


def read_json_object(path: Path) -> dict[str, Any]:
    data = read_json(path)
    if not isinstance(data, dict):
        raise MergeCliError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


@dataclass(frozen=True)
class ModelSource:
    ref: str
    path: Path
    kind: Literal["full", "lora"]
    fingerprint: str
    origin: Path | None = None  # the file or folder the user named (a .gguf file, a hub cache folder)

    def config(self) -> dict:
        return read_json_object(self.path / ("adapter_config.json" if self.kind == "lora" else "config.json"))

    @property
    def input_paths(self) -> list[Path]:
        """Every real path this model's files live at (for the never-write-into-an-input check)."""
        paths = {real(self.path)} | ({real(self.origin)} if self.origin else set())
        if self.path.is_dir() and self.origin is None:  # a linked file's folder (a hub cache's blobs), a linked folder
            paths |= {real(p) if p.is_dir() else real(p).parent for p in self.path.iterdir() if p.is_symlink()}
        return sorted(paths)


def resolve_model(ref: str, root: Path) -> ModelSource:
    """Find the model behind a reference (downloading hub ids where the hub is reachable)."""
    location = resolve_reference(ref, root)
    if isinstance(location, Path):
        if location.is_file() and location.suffix == ".gguf":

            fingerprint = "gguf:" + _file_fingerprint(location)
            return ModelSource(ref, gguf_folder(location, fingerprint), "full", fingerprint, origin=location)
        if not location.is_dir():
            if _exists(location):
                raise MergeCliError(f"model path is not a folder: {location}")
            raise MergeCliError(f"model path does not exist: {location}")
        source = ModelSource(ref, location, _kind(location), _local_fingerprint(location))
    else:
        repo_id, _, revision = ref.partition("@")
        folder = _download(repo_id, revision or None)
        source = ModelSource(ref, folder, _kind(folder), f"hub:{repo_id}@{folder.name}")
    refuse_custom_code(source.path)
    return source


def refuse_custom_code(folder: Path) -> None:
    """A model whose config or tokenizer names its own Python code (`auto_map`) is refused: mergecli
    never runs a model's code (every load passes trust_remote_code=False, which must not prompt)."""
    for name in ("config.json", "tokenizer_config.json", "adapter_config.json"):
        path = folder / name
        if path.is_file():
            data = read_json(path)
            if isinstance(data, dict) and data.get("auto_map"):
                raise MergeCliError(f"{path}: this model needs custom code (auto_map: "
                                    f"{', '.join(sorted(data['auto_map']))}); mergecli never runs a model's own code",
                                    "use a model whose architecture transformers implements itself")


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
    digest = hashlib.sha256(str(real(folder)).encode())
    for path in sorted(folder.iterdir()):
        if path.is_file():
            stat = path.stat()
            digest.update(f"\0{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
            if path.suffix in WEIGHT_SUFFIXES:
                digest.update(head_digest(path).encode())
    return "local:" + digest.hexdigest()[:32]


def _file_fingerprint(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{real(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\0{head_digest(path)}".encode()
                          ).hexdigest()[:32]


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
