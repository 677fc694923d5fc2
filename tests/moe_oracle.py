"""mergekit-moe 0.1.5's router computation transcribed in plain torch (no mergecli code), tiny
models and configs for the MoE tests (`test_moe.py`, `test_moe_mergekit_slow.py`).

`reference_routers` is `mergekit/moe/router.py:get_gate_params` with the tokenizer set up as
`mergekit/scripts/moe.py:build` does, the base loaded whole by transformers (in `dtype`: mergekit
uses bfloat16) and `output_hidden_states=True`, whose first L entries are the decoder blocks' inputs.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import yaml
from helpers import fine_tune, make_llama

PROMPTS = {
    "code": ["def add(a, b):", "import os\nfor name in os.listdir('.'):"],
    "verse": ["Shall I compare thee to a summer's day?"],
    "math": ["Q: what is 12 plus 7? A:", "Q: what is 3 plus 4?"],
}


def build_moe_models(root: Path) -> Path:
    """An untied LLaMA base (2 layers) and three full fine-tunes of it (`e0`, `e1`, `e2`), plus one
    with another MLP width (`wide`)."""
    make_llama(root / "base", seed=0, tie=False)
    for i in range(3):
        fine_tune(root / "base", root / f"e{i}", seed=10 + i, scale=0.05, fraction=0.5)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(5)
    config = LlamaConfig.from_pretrained(root / "base")
    config.intermediate_size = 48
    LlamaForCausalLM(config).save_pretrained(root / "wide")
    return root


def moe_config(path: Path, gate_mode: str = "hidden", shared: str | None = None, **extra) -> Path:
    """A mergekit-moe config over the models of `build_moe_models` (paths relative to it): three
    experts, one with negative prompts, one with a residual_scale; with `shared` (a model's
    name), `e0`, `e1` are the routed experts and that model, with the third's prompts and a
    residual_scale of 2, the shared one (Qwen2-MoE). mergekit 0.1.5 can only read a shared expert
    that is also the base or a routed expert (it opens only those models)."""
    experts = [
        {"source_model": "e0", "positive_prompts": PROMPTS["code"], "residual_scale": 0.5},
        {"source_model": "e1", "positive_prompts": PROMPTS["verse"], "negative_prompts": PROMPTS["code"][:1]},
        {"source_model": "e2", "positive_prompts": PROMPTS["math"]},
    ]
    data = {"base_model": "base", "gate_mode": gate_mode, "dtype": "float32", "experts_per_token": 2,
            "experts": experts[:2] if shared else experts}
    if shared:
        data["shared_experts"] = [dict(experts[2], source_model=shared, residual_scale=2.0)]
    data.update(extra)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def reference_routers(config: dict, root: Path, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    """(layers, gated experts, hidden): mergekit's gate vectors for `config` (a parsed mergekit-moe
    config whose paths are relative to `root`)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    base = root / config["base_model"]
    model_cfg = AutoConfig.from_pretrained(base)
    experts = list(config["experts"])
    shared = config.get("shared_experts") or []
    mode = config.get("gate_mode", "hidden")
    if shared and (shared[0].get("positive_prompts") or mode in ("random", "uniform_random")):
        experts += shared
    shape = (model_cfg.num_hidden_layers, len(experts), model_cfg.hidden_size)
    if mode == "random":
        torch.manual_seed(seed)
        return torch.randn(shape)
    if mode == "uniform_random":
        torch.manual_seed(seed)
        scale = math.sqrt(1.0 / model_cfg.hidden_size)
        return torch.rand(shape) * 2 * scale - scale
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.padding_side = "left"
    tokenizer.pad_token_id = tokenizer.bos_token_id
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token

    def tokenize(prompts):
        return tokenizer([(tokenizer.bos_token or "") + p for p in prompts], return_tensors="pt", padding=True,
                         add_special_tokens=False)

    if mode == "cheap_embed":
        from safetensors.torch import load_file

        embed = load_file(base / "model.safetensors")["model.embed_tokens.weight"]

        def vector(tokenized):
            onehot = torch.nn.functional.one_hot(tokenized["input_ids"], num_classes=model_cfg.vocab_size)
            h = onehot.float() @ embed.float()
            embedded = (h * tokenized["attention_mask"].unsqueeze(-1)).sum(dim=1).sum(dim=0, keepdim=True)
            res = embedded / embedded.norm(dim=-1, keepdim=True).clamp(min=1e-8)
            return res.repeat(model_cfg.num_hidden_layers, 1)
    else:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype).eval()

        def vector(tokenized):
            with torch.no_grad():
                output = model(**tokenized, output_hidden_states=True, return_dict=True)
            hidden = torch.stack(output.hidden_states[:-1])  # (layers, batch, seq, hidden)
            if mode == "hidden_avg":
                hidden = hidden.sum(dim=2) / hidden.shape[2]
            else:
                hidden = hidden[:, :, -1, :]
            return hidden.sum(dim=1) / hidden.shape[1]

    vectors = []
    for expert in experts:
        states = vector(tokenize(expert["positive_prompts"]))
        if expert.get("negative_prompts"):
            states -= vector(tokenize(expert["negative_prompts"]))
        states /= states.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)
        vectors.append(states)
    return torch.stack(vectors, dim=0).permute(1, 0, 2)


def load_state(folder: Path) -> dict[str, torch.Tensor]:
    """Every stored tensor of a model folder, by its stored name."""
    from safetensors import safe_open

    found = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            found.update({name: handle.get_tensor(name) for name in handle.keys()})
    return found
