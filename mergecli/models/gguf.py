"""GGUF files as models: dequantized once through transformers' GGUF loader into a plain HF folder.

transformers reads (and dequantizes) GGUF with the `gguf` package, but refuses to save a model it
considers quantized; the config's `quantization_config` is dropped, a fresh model is built from
it and the dequantized weights loaded, then saved as safetensors (fp32) with the tokenizer. The
result is cached under $MERGECLI_CACHE (default ~/.cache/mergecli), keyed by the file's
fingerprint, built atomically under a lock and checked against its file list before reuse.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import shutil
from pathlib import Path
from typing import Callable

from ..errors import MergeCliError
from ..fsutil import building, cache_root, is_owned, locked, publish, seal, unsealed
from .quiet import quiet_libraries


ROLE = "converted gguf"
# Part of every cache key: folders an older mergecli left here (without ownership markers) are
# never read or replaced, a new format simply lands beside them.
FORMAT = "2"


def gguf_folder(file: Path, fingerprint: str, log: Callable[[str], None] = lambda message: None) -> Path:
    """The converted folder for a GGUF file (converted now unless cached)."""
    key = hashlib.sha256(f"{FORMAT}:{fingerprint}".encode()).hexdigest()[:20]
    with locked(cache_root() / "locks" / f"gguf-{key}.lock"):
        final = _slot(cache_root() / "gguf", key)
        if is_owned(final, ROLE) and unsealed(final) is None:
            return final
        if is_owned(final, ROLE):
            shutil.rmtree(final)
        with building(final, ROLE) as tmp:
            _convert(file, tmp, log)
            seal(tmp)
            publish(tmp, final, owned=lambda f: is_owned(f, ROLE))
    return final


def _slot(parent: Path, key: str) -> Path:
    """`key`, or `key-1`, `key-2`...: the first name that is free or holds our conversion. A folder
    at the name that mergecli did not mark (an older version's, or anyone's) is passed over, never
    read as a model or replaced."""
    for n in range(100):
        candidate = parent / (key if n == 0 else f"{key}-{n}")
        if not (candidate.exists() or candidate.is_symlink()) or is_owned(candidate, ROLE):
            return candidate
    raise MergeCliError(f"{parent} holds 100 folders named {key}* that mergecli did not make",
                        "remove them or set MERGECLI_CACHE to another folder")


def _convert(file: Path, folder: Path, log: Callable[[str], None]) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer


    quiet_libraries()
    log(f"dequantizing {file.name} (once; cached in {cache_root()})")
    try:  # transformers' GGUF reader draws its own tqdm bar, whatever its verbosity says
        with contextlib.redirect_stderr(io.StringIO()):
            tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name, trust_remote_code=False)
            loaded = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32,
                                                          trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - the gguf reader raises many kinds
        raise MergeCliError(f"cannot read GGUF file {file}: {str(exc).splitlines()[0]}",
                            "is the `gguf` package installed and the architecture supported by transformers?") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False)
    model.load_state_dict(loaded.state_dict())
    model.eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
