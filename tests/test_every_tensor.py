"""Every tensor accounted for: whatever names transformers gives a tensor in its module tree, every
tensor of every input file is merged, or the run names it and says why.

The reference merges here are computed from the files with safetensors alone (no mergecli code):
task arithmetic at lambda 1 of a full fine-tune and a LoRA adapter is base + (ft - base) +
scale * B @ A for every stored tensor; then the merged folder must hold exactly the base's names
and dtypes, and transformers must load it into a model whose logits are the fine-tune's with the
adapter merged by peft.
"""

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from helpers import TINY_CONFIGS, cli, digests, error_line, make_tokenizer, tiny_config, write_recipe
from test_architectures import lora_targets

# what the files call a module the model class renames (GPT-NeoX's output layer)
FILE_NAME = {"gpt_neox": {"lm_head.weight": "embed_out.weight"}}


def save_base_and_fine_tune(folder, model_type: str, legacy_gpt2: bool = False) -> None:
    """base/ and full/ (every tensor of the fine-tune changed), each as transformers saves it."""
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(tiny_config(model_type)).eval()
    base.save_pretrained(folder / "base")
    make_tokenizer(folder / "base")
    with torch.no_grad():
        for p in base.parameters():
            p.add_(0.02 * torch.randn_like(p))
    base.save_pretrained(folder / "full")
    if legacy_gpt2:  # the hub's gpt2: no `transformer.` prefix, and old causal-mask buffers
        weights = folder / "base" / "model.safetensors"
        masks = {f"h.{i}.attn.bias": torch.ones(1, 1, 32, 32).tril() for i in range(2)}
        save_file({**{k.removeprefix("transformer."): v for k, v in load_file(weights).items()}, **masks}, weights,
                  metadata={"format": "pt"})


def save_lora(folder, model_type: str, extra_targets: tuple[str, ...] = ()) -> None:
    model = AutoModelForCausalLM.from_pretrained(folder / "full")
    targets = [*lora_targets(model), *extra_targets]
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False,
                                                  fan_in_fan_out=model_type == "gpt2"))
    peft_model.save_pretrained(folder / "lora", save_embedding_layers=False)  # factors only


def expected_tensors(folder, model_type: str) -> dict[str, torch.Tensor]:
    """base + (ft - base) + the adapter's scale * B @ A, per tensor the base's files store."""
    base = load_file(folder / "base" / "model.safetensors")
    fine = load_file(folder / "full" / "model.safetensors")
    adapter = load_file(folder / "lora" / "adapter_model.safetensors")
    config = json.loads((folder / "lora" / "adapter_config.json").read_text())
    expected = {}
    for name, theta in base.items():  # a legacy base names them without the prefix its fine-tunes have
        key = name if name in fine else f"transformer.{name}"
        expected[name] = theta + (fine[key] - theta) if key in fine else theta.clone()  # buffers: the base's
    for key, a in adapter.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        delta = adapter[key.replace("lora_A", "lora_B")] @ a * (config["lora_alpha"] / config["r"])
        name = FILE_NAME.get(model_type, {}).get(f"{module}.weight", f"{module}.weight")
        if name not in expected:  # a legacy base stores it without the prefix
            name = name.removeprefix("transformer.")
        expected[name] = expected[name] + (delta.T if config["fan_in_fan_out"] else delta)
    return expected


CASES = [*TINY_CONFIGS, "gpt2-legacy"]


@pytest.mark.parametrize("case", CASES)
def test_every_tensor_of_a_fine_tune_and_an_adapter_reaches_the_merge(tmp_path, case):
    """For every architecture `mergecli archs` lists (GPT-NeoX with its untied `embed_out`, MoE
    models whose experts are stored one tensor each) and a checkpoint with pre-v5 names."""
    model_type = case.removesuffix("-legacy")
    save_base_and_fine_tune(tmp_path, model_type, legacy_gpt2=case == "gpt2-legacy")
    save_lora(tmp_path, model_type, extra_targets=("lm_head",) if model_type == "gpt_neox" else ())
    recipe = write_recipe(tmp_path / "r.yaml", str(tmp_path / "base"), [
        {"name": "full", "model": "./full"}, {"name": "lora", "model": "./lora", "check_base": False}],
        [{"name": "ta", "method": "task_arithmetic", "lambda": 1.0}])
    result = json.loads(cli("--json", "merge", recipe).stdout)[0]

    written = load_file(tmp_path / "out" / "ta" / "model.safetensors")
    base = load_file(tmp_path / "base" / "model.safetensors")
    assert {k: v.dtype for k, v in written.items()} == {k: v.dtype for k, v in base.items()}
    for name, expected in expected_tensors(tmp_path, model_type).items():
        torch.testing.assert_close(written[name], expected, rtol=1e-5, atol=2e-6, msg=name)
    buffers = [n for n in base if n.endswith(".attn.bias")]
    assert result["account"]["merged"] == len(base) - len(buffers)
    assert result["account"]["copied"] == ({"a buffer, not a weight": sorted(buffers)} if buffers else {})

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "ta").eval()
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "full"),
                                          tmp_path / "lora").merge_and_unload().eval()
    ids = torch.tensor([[1, 5, 9, 12, 7, 4, 8, 10]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.fixture
def llama_pair(tmp_path):
    save_base_and_fine_tune(tmp_path, "llama")
    return tmp_path


def test_a_fine_tune_tensor_the_base_lacks_is_refused_naming_it_and_its_file(llama_pair):
    weights = llama_pair / "full" / "model.safetensors"
    save_file({**load_file(weights), "model.layers.0.self_attn.o_proj.bias": torch.ones(32)}, weights,
              metadata={"format": "pt"})
    recipe = write_recipe(llama_pair / "r.yaml", str(llama_pair / "base"), [{"name": "full", "model": "./full"}],
                          [{"name": "ta", "method": "task_arithmetic"}])
    line = error_line(cli("merge", recipe, code=2))
    assert f"not in the base: model.layers.0.self_attn.o_proj.bias (in {weights})" in line
    assert not (llama_pair / "out").exists()


def test_buffers_a_fine_tune_carries_are_skipped_and_listed(llama_pair):
    """Buffers older transformers saved (rotary tables) carry no weights: the fine-tune's are not
    written, and the log and the account say so; every weight is merged."""
    weights = llama_pair / "full" / "model.safetensors"
    tables = {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.rand(4) for i in range(2)}
    save_file({**load_file(weights), **tables}, weights, metadata={"format": "pt"})
    recipe = write_recipe(llama_pair / "r.yaml", str(llama_pair / "base"), [{"name": "full", "model": "./full"}],
                          [{"name": "ta", "method": "task_arithmetic"}])
    log = cli("merge", recipe).stderr
    assert "2 buffers of full skipped (not weights; the base has none) (model.layers.0.self_attn" in log
    account = json.loads((llama_pair / "out" / "ta" / "mergecli.json").read_text())["result"]["account"]
    assert account["skipped_buffers"] == {"full": sorted(tables)}
    assert json.loads(cli("--json", "merge", recipe).stdout)[0]["account"] == account  # reused, same account
    base = load_file(llama_pair / "base" / "model.safetensors")
    assert account["merged"] == len(base) and not account["copied"]
    assert set(load_file(llama_pair / "out" / "ta" / "model.safetensors")) == set(base)
    card = (llama_pair / "out" / "ta" / "README.md").read_text()
    assert f"Tensors: {len(base)} merged; 2 buffers of full skipped" in card


def test_an_adapter_only_merge_says_which_tensors_it_copied_from_the_base(tmp_path):
    from helpers import make_llama, make_lora

    make_llama(tmp_path / "base")
    make_lora(tmp_path / "base", tmp_path / "lora", seed=1, targets=("q_proj",))
    recipe = write_recipe(tmp_path / "r.yaml", str(tmp_path / "base"), [{"name": "lora", "model": "./lora"}],
                          [{"name": "ta", "method": "task_arithmetic"}])
    log = cli("merge", recipe).stderr
    assert "18 copied from the base: no fine-tune changes it (model.embed_tokens.weight" in log
    account = json.loads(cli("--json", "merge", recipe).stdout)[0]["account"]
    assert account["merged"] == 2  # q_proj of both layers
    assert len(account["copied"]["no fine-tune changes it"]) == 18


@pytest.mark.parametrize("method,weights,extra", [
    ("ties", [1.0, -0.999], {}),
    ("dare_ties", [1.0, 1.0, -0.95], {}),
    ("task_arithmetic", [1.0, -0.95], {"normalize": True}),
    ("linear", [1.0, -0.95], {}),
])
def test_weights_whose_mean_divides_by_almost_zero_are_refused_with_the_numbers(llama_pair, method, weights, extra):
    """TIES with weights 1 and -0.999 divides, where both agree, by 0.001: the merged change would
    be up to 1999 times the largest task-vector entry. Refused before any model is read."""
    models = [{"name": f"m{i}", "model": "./full", "weight": w} for i, w in enumerate(weights)]
    recipe = write_recipe(llama_pair / "r.yaml", str(llama_pair / "base"), models,
                          [{"name": "v", "method": method, **extra}])
    line = error_line(cli("validate", recipe, code=2))
    assert "weighted mean can be" in line and "times the largest task-vector entry" in line
    assert not (llama_pair / "ws").exists()


def test_positive_weights_and_plain_sums_are_never_refused(llama_pair):
    models = [{"name": "a", "model": "./full", "weight": 1.0}, {"name": "b", "model": "./full", "weight": -0.999}]
    recipe = write_recipe(llama_pair / "r.yaml", str(llama_pair / "base"), models,
                          [{"name": "negation", "method": "task_arithmetic"},
                           {"name": "sum", "method": "ties", "normalize": False}])
    cli("validate", recipe)


def test_model_stock_stops_where_its_ratio_would_blow_up():
    """Model Stock's ratio N cos / (1 + (N - 1) cos) for two task vectors at cos -0.9 is -18."""
    from mergecli.methods.stock import stock_ratio
    from mergecli.methods.table import Unbounded

    a = torch.tensor([1.0, 0.0])
    b = torch.tensor([-0.9, 0.4358899])  # unit vector at cos -0.9 from a
    with pytest.raises(Unbounded, match="-18"):
        stock_ratio([a, b])
    assert float(stock_ratio([a, torch.tensor([0.0, 1.0])])) == 0.0


def test_a_folder_link_inside_a_model_protects_the_model_not_its_parent(llama_pair):
    """`sub -> .` inside the base: an output folder beside the model is fine (the link's own target
    is the model folder), and one inside it is refused naming the model folder."""
    (llama_pair / "base" / "sub").symlink_to(".", target_is_directory=True)
    recipe = write_recipe(llama_pair / "r.yaml", str(llama_pair / "base"), [{"name": "full", "model": "./full"}],
                          [{"name": "ta", "method": "task_arithmetic"}])
    before = digests(llama_pair / "base", llama_pair / "full")
    cli("merge", recipe)
    inside = write_recipe(llama_pair / "r2.yaml", str(llama_pair / "base"), [{"name": "full", "model": "./full"}],
                          [{"name": "ta", "method": "task_arithmetic"}], output_dir="base/merged")
    line = error_line(cli("merge", inside, code=1))
    assert f"is inside the base model ({(llama_pair / 'base').resolve()})" in line
    assert digests(llama_pair / "base", llama_pair / "full") == before


def test_a_weights_file_link_that_loops_is_named_as_such(llama_pair):
    weights = llama_pair / "full" / "model.safetensors"
    weights.unlink()
    weights.symlink_to(weights.name)
    recipe = write_recipe(llama_pair / "r.yaml", str(llama_pair / "base"), [{"name": "full", "model": "./full"}],
                          [{"name": "ta", "method": "task_arithmetic"}])
    line = error_line(cli("taskvec", recipe, code=1))
    assert f"{weights}: a symbolic link that loops" in line and "index.json" not in line
