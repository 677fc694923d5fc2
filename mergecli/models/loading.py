"""Loading a model to run it (calibration, evaluation): transformers, never with the model's own code.

A LoRA adapter runs as its base with the adapter merged in by peft. Library chatter (progress bars,
"generation flags" notices) is silenced: the user sees mergecli's own progress.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import MergeCliError
from .quiet import quiet_libraries
from .reference import ModelSource, tokenizer_folder


def load_tokenizer(*folders: Path):
    from transformers import AutoTokenizer

    quiet_libraries()
    folder = tokenizer_folder(*folders)
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - tokenizers fail in many ways on damaged files
        raise MergeCliError(f"{folder}: cannot load the tokenizer ({str(exc).splitlines()[0]})") from None


def load_causal_lm(source: ModelSource, base: Path, use_base: bool = False) -> torch.nn.Module:
    """The model in eval mode, fp32 (LoRA: base + adapter, merged; `use_base`: the base itself)."""
    from transformers import AutoModelForCausalLM

    quiet_libraries()
    folder = base if use_base or source.kind == "lora" else source.path
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=False)
        if source.kind == "lora" and not use_base:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, source.path).merge_and_unload()
    except MergeCliError:
        raise
    except Exception as exc:  # noqa: BLE001 - transformers/peft raise many kinds on bad folders
        raise MergeCliError(f"{folder}: cannot load the model ({str(exc).splitlines()[0]})") from None
    return model.eval()
