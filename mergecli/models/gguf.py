"""GGUF files as models: dequantized once through transformers' GGUF loader into a plain HF folder.

transformers reads (and dequantizes) GGUF with the `gguf` package, but refuses to save a model it
considers quantized; the config's `quantization_config` is dropped, a fresh model is built from
it and the dequantized weights loaded, then saved as safetensors (fp32) with the tokenizer. The
result is cached under $MERGECLI_CACHE (default ~/.cache/mergecli), keyed by the file's
fingerprint, with the workspace's atomic-build and locking rules.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import MergeCliError


def cache_root() -> Path:
    return Path(os.environ.get("MERGECLI_CACHE", Path.home() / ".cache" / "mergecli"))


def gguf_folder(file: Path, fingerprint: str, log=lambda message: None) -> Path:
    """The converted folder for a GGUF file (converted now unless cached)."""
    from ..workspace import Workspace

    def convert(folder: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        log(f"dequantizing {file.name} (once; cached in {cache_root()})")
        try:
            tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
            loaded = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32)
        except Exception as exc:  # noqa: BLE001 - the gguf reader raises many kinds
            raise MergeCliError(f"cannot read GGUF file {file}: {str(exc).splitlines()[0]}",
                                "is the `gguf` package installed and the architecture supported by transformers?") from None
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.eval().save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    ws = Workspace(cache_root(), log=log)
    artifact, _ = ws.get_or_build("gguf", {"file": fingerprint}, f"gguf {file.name}", convert)
    return artifact.path
