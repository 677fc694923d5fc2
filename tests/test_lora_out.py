"""LoRA out: peft loads the adapter, and base + adapter (peft's merge_and_unload) equals base + dW
exactly at full rank, and within the Eckart-Young error sqrt(sum of dropped sigma^2) below it.

The deltas are taken from peft itself (merged model minus base), not from mergecli's LoRA reader."""

import json

import pytest
import torch

from helpers import make_llama, make_lora
from mergecli.engine.lora_out import module_kinds, truncate, write_adapter


def _state(model):
    return {k: v.detach().clone().float() for k, v in model.state_dict().items()}


def _merged_state(base_folder, adapter_folder):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_folder).eval()
    return _state(PeftModel.from_pretrained(base, str(adapter_folder)).merge_and_unload())


@pytest.fixture(scope="module")
def two_loras(tmp_path_factory):
    """A tied tiny LLaMA, two rank-4 adapters on q/v, and each adapter's delta per weight."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("lora_out")
    make_llama(root / "base", seed=0)
    base = _state(AutoModelForCausalLM.from_pretrained(root / "base"))
    deltas = []
    for seed, name in ((3, "lora_a"), (4, "lora_b")):
        merged = _state(make_lora(root / "base", root / name, seed=seed).merge_and_unload())
        deltas.append({n: merged[n] - base[n] for n in base if not torch.equal(merged[n], base[n])})
    return root, base, deltas


def test_truncation_is_eckart_young():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(12, 7, generator=g) @ torch.diag(torch.linspace(3, 0.1, 7)) @ torch.randn(7, 7, generator=g)
    sigma = torch.linalg.svdvals(delta.double())
    for r in (1, 3, 7, 20):
        f = truncate(delta, r)
        dropped = float(sigma[min(r, 7):].square().sum())
        assert f.rank == min(r, 7)
        assert float((delta - f.B @ f.A).norm().square()) == pytest.approx(dropped, abs=1e-4)
        assert f.error == pytest.approx(dropped ** 0.5, abs=1e-4)
        assert f.energy_kept == pytest.approx(1 - dropped / float(sigma.square().sum()), abs=1e-6)
        assert float(f.A.norm()) == pytest.approx(float(f.B.norm()), rel=1e-4)  # sqrt(S) on both sides


def test_two_loras_merged_back_exactly_at_full_rank(two_loras, tmp_path):
    from transformers import AutoModelForCausalLM

    root, base, (d1, d2) = two_loras
    merged = {n: 0.6 * d1.get(n, 0) + 0.9 * d2.get(n, 0) for n in set(d1) | set(d2)}  # task arithmetic, rank <= 8
    kinds = module_kinds(AutoModelForCausalLM.from_pretrained(root / "base"))
    report = write_adapter(tmp_path / "out", merged, kinds, rank=8, base_model=str(root / "base"),
                           base=lambda n: base[n])
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 8 and len(config["target_modules"]) == 4
    assert config["target_modules"] == sorted(config["target_modules"])  # peft's set, written the same every run
    assert json.loads((tmp_path / "out" / "mergecli_lora.json").read_text())["rank"] == 8
    assert all(r.kind == "lora" and r.energy_kept == pytest.approx(1.0, abs=1e-6) for r in report.values())
    out = _merged_state(root / "base", tmp_path / "out")
    for name, value in base.items():
        assert torch.allclose(out[name], value + merged.get(name, 0), atol=1e-5), name


def test_two_loras_truncated_within_the_dropped_energy(two_loras, tmp_path):
    root, base, (d1, d2) = two_loras
    merged = {n: 0.6 * d1.get(n, 0) + 0.9 * d2.get(n, 0) for n in set(d1) | set(d2)}
    kinds = {n: "linear" for n in merged}
    folder = tmp_path / "out"
    report = write_adapter(folder, iter(merged.items()), kinds, rank=3, base_model=str(root / "base"),
                           base=lambda n: base[n])  # pairs read one at a time, as the merge stage gives them
    out = _merged_state(root / "base", folder)
    for name, delta in merged.items():
        sigma = torch.linalg.svdvals(delta.double())
        dropped = float(sigma[3:].square().sum())
        error = float((out[name] - base[name] - delta).double().norm().square())
        assert error == pytest.approx(dropped, rel=1e-3, abs=1e-9), name
        module = name.removesuffix(".weight")
        assert report[module].energy_kept == pytest.approx(1 - dropped / float(sigma.square().sum()), abs=1e-5)
        assert report[module].rank == 3


def test_full_fine_tune_of_gpt2_exact_at_full_rank(tmp_path):
    """Conv1D (in x out), biases of targeted layers, layer norms, tied and position embeddings."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=96, n_positions=64, bos_token_id=1,
                        eos_token_id=2)
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(tmp_path / "base")
    base = _state(model)
    g = torch.Generator().manual_seed(5)
    deltas = {n: torch.randn(v.shape, generator=g) * 0.01 for n, v in base.items() if n != "lm_head.weight"}
    deltas["transformer.h.1.mlp.c_proj.bias"] = torch.zeros_like(deltas["transformer.h.1.mlp.c_proj.bias"])
    report = write_adapter(tmp_path / "out", deltas, module_kinds(model), rank=96, base_model=str(tmp_path / "base"),
                           base=lambda n: base[n])
    assert report["transformer.wte"].kind == "embedding" and report["transformer.wpe"].kind == "embedding"
    assert report["transformer.h.0.attn.c_attn"].kind == "lora"
    assert report["transformer.h.0.ln_1.weight"].kind == "full"
    assert "transformer.h.1.mlp.c_proj.bias" not in report  # unchanged: not written
    adapter_config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert adapter_config["fan_in_fan_out"] is True
    assert "transformer.h.0.ln_1" in adapter_config["modules_to_save"]
    assert adapter_config["rank_pattern"]  # 32 < 96: per-module ranks
    out = _merged_state(tmp_path / "base", tmp_path / "out")
    for name, value in base.items():
        expected = value + deltas.get(name if name != "lm_head.weight" else "transformer.wte.weight", 0)
        assert torch.allclose(out[name], expected, atol=1e-5), name


def test_nothing_to_write_and_bad_rank():
    with pytest.raises(ValueError, match="nothing"):
        write_adapter(None, {"w.weight": torch.zeros(2, 2)}, {"w.weight": "linear"}, 2, "b", lambda n: None)
    with pytest.raises(ValueError, match="rank"):
        write_adapter(None, {"w.weight": torch.ones(2, 2)}, {"w.weight": "linear"}, 0, "b", lambda n: None)
