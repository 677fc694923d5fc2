import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from helpers import fine_tune, make_llama, make_lora  # noqa: E402


@pytest.fixture(autouse=True)
def _hf_home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.getbasetemp() / "hf_home"))


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> Path:
    """A tiny tied LLaMA base, two full fine-tunes and one LoRA adapter, built once per session."""
    root = tmp_path_factory.mktemp("models")
    make_llama(root / "base", seed=0)
    fine_tune(root / "base", root / "ft_a", seed=1)
    fine_tune(root / "base", root / "ft_b", seed=2)
    make_lora(root / "base", root / "lora_c", seed=3)
    return root
