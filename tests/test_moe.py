"""`mergecli moe`: mergekit-moe configs built into Mixtral and Qwen2-MoE folders on tiny local models.

Every stored tensor is checked: attention, norms, embeddings and the output layer equal the
base's, each expert equals its model's MLP (down_proj times residual_scale), each router equals
`moe_oracle.reference_routers` (mergekit's computation transcribed in plain torch, the base loaded
whole) to fp32 rounding; the folder loads in transformers with no missing or unexpected key and
generates. `test_moe_mergekit_slow.py` compares with mergekit-moe itself.
"""

import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import cli, digests, error_line
from moe_oracle import build_moe_models, load_state, moe_config, reference_routers

MLP = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory) -> Path:
    return build_moe_models(tmp_path_factory.mktemp("moe"))


def run(config: Path, *args, code=0):
    result = cli("--json", "moe", config, *args, code=code)
    return json.loads(result.stdout) if code == 0 else result


def loads_and_generates(folder: Path, cls: str):
    import transformers

    model, info = getattr(transformers, cls).from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    batch = tokenizer("def add", return_tensors="pt")
    out = model.eval().generate(**batch, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == batch["input_ids"].shape[1] + 4
    return model


@pytest.mark.parametrize("mode", ["hidden", "hidden_avg", "cheap_embed"])
def test_mixtral_every_tensor_and_the_routers_match_mergekits_math(moe_models, mode):
    config = moe_config(moe_models / f"{mode}.yml", mode)
    result = run(config)
    out = Path(result["path"])
    assert out == moe_models / "merged" / mode and result["architecture"] == "mixtral" and not result["reused"]
    ours = load_state(out)
    base = load_state(moe_models / "base")
    experts = [load_state(moe_models / f"e{i}") for i in range(3)]
    expected = reference_routers(yaml.safe_load(config.read_text()), moe_models)
    scales = [0.5, 1.0, 1.0]
    names = set()
    for name, value in base.items():
        if ".mlp." not in name:
            assert torch.equal(ours[name], value), name
            names.add(name)
    for layer in range(2):
        prefix = f"model.layers.{layer}.block_sparse_moe"
        for e in range(3):
            for short, part in MLP.items():
                source = experts[e][f"model.layers.{layer}.mlp.{part}.weight"]
                if part == "down_proj":
                    source = source * scales[e]
                assert torch.equal(ours[f"{prefix}.experts.{e}.{short}.weight"], source)
                names.add(f"{prefix}.experts.{e}.{short}.weight")
        router = ours[f"{prefix}.gate.weight"]
        assert router.shape == (3, 32) and router.dtype == torch.float32
        torch.testing.assert_close(router, expected[layer], rtol=0, atol=2e-6)
        names.add(f"{prefix}.gate.weight")
    assert set(ours) == names  # nothing else
    assert not torch.equal(expected[0], expected[1]) or mode == "cheap_embed"  # hidden gates differ by layer
    config_json = json.loads((out / "config.json").read_text())
    assert config_json["model_type"] == "mixtral" and config_json["num_local_experts"] == 3
    assert config_json["num_experts_per_tok"] == 2 and config_json["sliding_window"] is None
    assert (out / "tokenizer.json").read_bytes() == (moe_models / "base" / "tokenizer.json").read_bytes()
    assert (out / "mergekit_moe_config.yml").read_text() == config.read_text()
    model = loads_and_generates(out, "MixtralForCausalLM")
    torch.testing.assert_close(model.model.layers[1].mlp.gate.weight.detach(), expected[1], rtol=0, atol=2e-6)
    # a second run reuses the folder; the inputs were never touched
    before = digests(moe_models / "base", moe_models / "e0")
    assert run(config)["reused"]
    assert digests(moe_models / "base", moe_models / "e0") == before


@pytest.mark.parametrize("mode", ["random", "uniform_random"])
def test_random_gates_are_mergekits_draw_after_its_seed(moe_models, tmp_path, mode):
    config = moe_config(moe_models / f"{mode}.yml", mode)
    first = Path(run(config, "--seed", 7, "--output", tmp_path / "a")["path"])
    expected = reference_routers(yaml.safe_load(config.read_text()), moe_models, seed=7)
    for layer in range(2):
        assert torch.equal(load_state(first)[f"model.layers.{layer}.block_sparse_moe.gate.weight"], expected[layer])
    other = Path(run(config, "--seed", 8, "--output", tmp_path / "b")["path"])
    assert not torch.equal(load_state(first)["model.layers.0.block_sparse_moe.gate.weight"],
                           load_state(other)["model.layers.0.block_sparse_moe.gate.weight"])
    assert not run(config, "--seed", 9, "--output", tmp_path / "a")["reused"]  # the seed is in the key


def test_qwen2_moe_with_a_shared_expert(moe_models):
    config = moe_config(moe_models / "shared.yml", "hidden", shared="e2", dtype="bfloat16")
    out = Path(run(config)["path"])
    ours = load_state(out)
    base = load_state(moe_models / "base")
    expected = reference_routers(yaml.safe_load(config.read_text()), moe_models)  # rows: e0, e1, shared e2
    assert all(v.dtype == torch.bfloat16 for v in ours.values())
    for layer in range(2):
        prefix = f"model.layers.{layer}.mlp"
        for part in ("gate_proj", "up_proj", "down_proj"):
            shared = load_state(moe_models / "e2")[f"{prefix}.{part}.weight"]
            scaled = shared * 2.0 if part == "down_proj" else shared
            assert torch.equal(ours[f"{prefix}.shared_expert.{part}.weight"], scaled.to(torch.bfloat16))
            assert torch.equal(ours[f"{prefix}.experts.1.{part}.weight"],
                               load_state(moe_models / "e1")[f"{prefix}.{part}.weight"].to(torch.bfloat16))
        for bias, rows in (("q", 32), ("k", 16), ("v", 16)):  # the base has none: zeros
            zeros = torch.zeros(rows, dtype=torch.bfloat16)
            assert torch.equal(ours[f"model.layers.{layer}.self_attn.{bias}_proj.bias"], zeros)
        # fp32 routers within fp32 rounding of the transcription, then rounded to bfloat16
        torch.testing.assert_close(ours[f"{prefix}.gate.weight"].float(), expected[layer, :2], rtol=2**-8, atol=1e-6)
        torch.testing.assert_close(ours[f"{prefix}.shared_expert_gate.weight"].float(), expected[layer, 2:],
                                   rtol=2**-8, atol=1e-6)
        assert torch.equal(ours[f"model.layers.{layer}.self_attn.o_proj.weight"],
                           base[f"model.layers.{layer}.self_attn.o_proj.weight"].to(torch.bfloat16))
    config_json = json.loads((out / "config.json").read_text())
    assert config_json["model_type"] == "qwen2_moe" and config_json["num_experts"] == 2
    assert config_json["moe_intermediate_size"] == config_json["shared_expert_intermediate_size"] == 64
    assert config_json["dtype"] == "bfloat16" and config_json["norm_topk_prob"] is True
    loads_and_generates(out, "Qwen2MoeForCausalLM")


def _bad(moe_models, tmp_path, change, *args):
    data = yaml.safe_load(moe_config(tmp_path / "c.yml").read_text())
    change(data)
    config = moe_models / f"bad-{tmp_path.name}.yml"
    config.write_text(yaml.safe_dump(data))
    result = run(config, "--output", tmp_path / "out", *args, code=None)
    assert result.exit_code == 2, result.stderr
    assert not (tmp_path / "out").exists()
    return error_line(result)


@pytest.mark.parametrize("change, key", [
    (lambda d: d.update(gate_mode="hiddn"), "gate_mode: 'hiddn'"),
    (lambda d: d["experts"][1].pop("positive_prompts"), "experts.1.positive_prompts"),
    (lambda d: d["experts"][2].update(source_model="wide"), "experts.2.source_model: model.layers.0.mlp.gate_proj"),
    (lambda d: d.update(experts_per_token=4), "experts: 3 expert(s) for experts_per_token 4"),
    (lambda d: d.update(dtype="int8"), "dtype: 'int8'"),
    (lambda d: d.update(merge_method="ties"), "a mergekit-yaml config"),
    (lambda d: d.update(slices=[]), "slices: not a mergekit-moe config key"),
    (lambda d: d["experts"][0].update(noise_scale=0.1), "experts.0.noise_scale: not supported"),
    (lambda d: d["experts"][0].update(source_model="base+lora"), "experts.0.source_model: 'base+lora'"),
    (lambda d: d.update(shared_experts=[{"source_model": "e2"}]), "shared_experts.0.positive_prompts"),
    (lambda d: d.update(architecture="deepseek"), "architecture: 'deepseek'"),
    (lambda d: d["experts"][1].update(source_model="missing"), "experts.1.source_model: model path does not exist"),
    (lambda d: [e.update(source_model="e0") for e in d["experts"]], "experts: every expert is the same model"),
])
def test_a_bad_config_is_one_line_naming_the_key(moe_models, tmp_path, change, key):
    assert key in _bad(moe_models, tmp_path, change)


def test_never_writes_into_an_input_nor_over_a_folder_it_did_not_make(moe_models, tmp_path):
    config = moe_config(moe_models / "guard.yml", "cheap_embed")
    before = digests(moe_models / "e1")
    line = error_line(run(config, "--output", moe_models / "e1" / "moe", code=1))
    assert "is inside experts.1.source_model 'e1'" in line and "never writes into its inputs" in line
    assert digests(moe_models / "e1") == before
    foreign = tmp_path / "theirs"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert "was not written by mergecli" in error_line(run(config, "--output", foreign, code=1))
    assert (foreign / "notes.txt").read_text() == "mine"


def test_a_tied_base_gives_a_tied_mixture(models, tmp_path):
    """The session's tied LLaMA (no lm_head stored) and two fine-tunes: the mixture is tied too."""
    config = tmp_path / "tied.yml"
    config.write_text(yaml.safe_dump({
        "base_model": str(models / "base"), "gate_mode": "cheap_embed", "experts_per_token": 1,
        "experts": [{"source_model": str(models / "ft_a"), "positive_prompts": ["def add(a, b):"]},
                    {"source_model": str(models / "ft_b"), "positive_prompts": ["Shall I compare thee"]}]}))
    out = Path(run(config)["path"])
    assert out == tmp_path / "merged" / "tied" and "lm_head.weight" not in load_state(out)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    model = loads_and_generates(out, "MixtralForCausalLM")
    assert model.lm_head.weight is model.model.embed_tokens.weight
