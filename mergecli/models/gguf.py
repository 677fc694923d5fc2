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
import os
import shutil
from pathlib import Path
from typing import Callable

from ..errors import MergeCliError
from ..fsutil import building, is_owned, locked, publish, seal, unsealed


ROLE = "converted gguf"


def cache_root() -> Path:
    return Path(os.environ.get("MERGECLI_CACHE", Path.home() / ".cache" / "mergecli"))


def gguf_folder(file: Path, fingerprint: str, log: Callable[[str], None] = lambda message: None) -> Path:
    """The converted folder for a GGUF file (converted now unless cached)."""
    key = hashlib.sha256(fingerprint.encode()).hexdigest()[:20]
    final = cache_root() / "gguf" / key
    with locked(cache_root() / "locks" / f"gguf-{key}.lock"):
        if is_owned(final, ROLE) and unsealed(final) is None:
            return final
        if is_owned(final, ROLE):
            shutil.rmtree(final)
        with building(final, ROLE) as tmp:
            _convert(file, tmp, log)
            seal(tmp)
            publish(tmp, final, owned=lambda f: is_owned(f, ROLE))
    return final


def _convert(file: Path, folder: Path, log: Callable[[str], None]) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .loading import quiet_libraries

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
