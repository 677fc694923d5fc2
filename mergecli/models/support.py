"""The architectures mergecli is tested on, as data: a tiny config per model_type.

Everything else the merge needs (linear layers, Conv1D orientation, tied parameters, input groups,
the decoder stack) is read off the model class itself (see architecture.py and collect.py), so a
new architecture needs no code, only a line here to be tested end to end and listed in the README
(`mergecli archs --format markdown` prints the table).
"""

from __future__ import annotations

from typing import Any

SMALL = {"vocab_size": 96, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}

TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": dict(SMALL, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=128),
    "mistral": dict(SMALL, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=128, sliding_window=None),
    "qwen2": dict(SMALL, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=128),
    "phi3": dict(SMALL, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, max_position_embeddings=128, original_max_position_embeddings=128),
    "gpt2": dict(SMALL, n_embd=32, n_layer=2, n_head=4, n_positions=128),
    "bloom": dict(SMALL, hidden_size=32, n_layer=2, n_head=4),
    "gpt_neox": dict(SMALL, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=128),
}


def tiny_config(model_type: str):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **TINY_CONFIGS[model_type])


def describe_supported() -> list[dict[str, Any]]:
    """One row per tested architecture, read off a tiny instance of it (the README table)."""
    import re

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..collect import find_groups
    from .architecture import describe_model

    rows = []
    for model_type in TINY_CONFIGS:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_config(model_type)).eval()
        arch = describe_model(model)
        groups = find_groups(model, torch.tensor([[1, 5, 9, 12, 7, 4, 8, 10]]))

        def block(names) -> list[str]:
            return sorted({re.sub(r"^.*?\.\d+\.", "", n) for n in names if re.search(r"\.0\.", n)})

        block_groups = [block(members) for members in groups.values() if any(".0." in m for m in members)]
        rows.append({
            "model_type": model_type,
            "class": type(model).__name__,
            "linear weights per block": ", ".join(n.removesuffix(".weight") for n in block(arch.linear)),
            "shared input groups": "; ".join("+".join(g) for g in block_groups if len(g) > 1) or "-",
            "stored in x out": ", ".join(n.removesuffix(".weight") for n in block(arch.transposed)) or "-",
            "tied embeddings by default": bool(AutoConfig.for_model(model_type).tie_word_embeddings),
        })
    return rows
