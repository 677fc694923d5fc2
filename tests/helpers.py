"""Tiny real models built locally: a trained tokenizer, a LLaMA base, fine-tunes and LoRA adapters."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

SMALL = {"vocab_size": 96, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}

TINY_CONFIGS: dict[str, dict] = {
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
                     max_position_embeddings=128),  # untied: the files' `embed_out` is the module `lm_head`
    # mixtures of experts: one tensor per expert in the files, one fused tensor per layer in the module tree
    "mixtral": dict(SMALL, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=128),
    "qwen2_moe": dict(SMALL, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                      shared_expert_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, max_position_embeddings=128),
}


def tiny_config(model_type: str):
    """A tiny config of a tested architecture (the fixtures every architecture test builds on)."""
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **TINY_CONFIGS[model_type])


TEXT = [
    "def add(a, b):\n    return a + b\n",
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate.",
    "Q: what is 12 plus 7? A: 19.",
    "import os\nfor name in os.listdir('.'):\n    print(name)\n",
] * 20


def make_tokenizer(folder: Path, vocab_size: int = 96):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", "<pad>"])
    tok.train_from_iterator(TEXT, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.save_pretrained(folder)
    return fast


def make_llama(folder: Path, seed: int = 0, layers: int = 2, tie: bool = True, vocab_size: int = 96):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
                         max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    make_tokenizer(folder, vocab_size)
    return model


def fine_tune(base: Path, folder: Path, seed: int, scale: float = 0.02, fraction: float = 0.3,
              shard_size: str | None = None, as_bin: bool = False):
    """A 'fine-tune': the base plus sparse random updates on every float tensor (seeded)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen) * scale
            param.add_(noise * (torch.rand(param.shape, generator=gen) < fraction))
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    if as_bin:
        folder.mkdir(parents=True, exist_ok=True)
        model.config.save_pretrained(folder)
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    else:
        model.save_pretrained(folder, **kwargs)
    return model


def make_lora(base: Path, folder: Path, seed: int, targets=("q_proj", "v_proj"), **extra):
    """A LoRA adapter with non-zero B (init_lora_weights=False), as after training."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights=False,
                        base_model_name_or_path=str(base), **extra)
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(folder)
    return peft_model


def write_recipe(path: Path, base: str, models: list[dict], merges: list[dict], **extra) -> Path:
    data = {"name": "test", "base": base, "models": models, "merges": merges,
            "workspace": "ws", "output_dir": "out", **extra}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def make_gguf(folder: Path, path: Path) -> Path:
    """Write the tiny LLaMA in `folder` (with its BPE tokenizer) as an fp32 GGUF file."""
    import json

    import gguf
    import numpy as np
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    config, state = model.config, model.state_dict()
    tokenizer = json.loads((folder / "tokenizer.json").read_text())["model"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("gpt2")
    tokens = sorted(tokenizer["vocab"], key=tokenizer["vocab"].get)
    writer.add_token_list(tokens)
    writer.add_token_types([1] * len(tokens))
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tokenizer["merges"]])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(3)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    parts = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(config.num_hidden_layers):
        names.update({f"model.layers.{i}.{hf}.weight": f"blk.{i}.{gg}.weight" for hf, gg in parts.items()})
    for hf, gg in names.items():
        writer.add_tensor(gg, state[hf].numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# -- shared by the CLI tests -------------------------------------------------------------------
CODE = [f"def f{i}(x):\n    return x * {i} + {i + 1}\n" for i in range(150)]
VERSE = [f"Shall I compare thee to a summer's day, number {i}? Thou art more lovely." for i in range(150)]


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    """A dataset file as users write them: one JSON object per line."""
    import json

    path.write_text("\n".join(json.dumps({field: t}) for t in texts))
    return path


def cli(*args, code: int | None = 0, input: str | None = None):
    """Run `mergecli ARGS` in-process; assert the exit code (unless None) and return the result."""
    from typer.testing import CliRunner

    from mergecli.app.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args], input=input)
    if code is not None:
        assert result.exit_code == code, f"exit {result.exit_code}\nstdout:{result.stdout}\nstderr:{result.stderr}"
    return result


def error_line(result) -> str:
    """The single `Error:` line a failed command printed (asserting there is exactly one, no traceback)."""
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def digests(*roots: Path) -> dict[str, str]:
    """sha256 of every file under the given paths (files or folders), to prove inputs untouched."""
    import hashlib

    found = {}
    for root in roots:
        for path in sorted([root] if root.is_file() else root.rglob("*")):
            if path.is_file():
                found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found
