"""Layer stacking in mergecli's own recipes (`layers:` blocks): copied and merged blocks, renumbered
layers, the tensors outside the stack from the first and last block, ranges checked before any
work, the account, the cache key, and the output loading in transformers.

mergekit's `slices` reach the same blocks through the translation (test_mergekit_config.py) and
are compared with mergekit itself in test_mergekit_slow.py.
"""

import json
from pathlib import Path

import pytest
import torch

from helpers import cli, error_line, fine_tune, make_lora, make_llama, write_recipe
from mergecli.engine.layout import BASE, Block, stacked
from mergecli.methods.settings import settings_of
from mergecli.models.architecture import Architecture
from mergecli.recipe.load import validate_recipe
from mergekit_oracle import load_folder

LLAMA = Architecture("llama", {"lm_head.weight": "model.embed_tokens.weight"}, frozenset(), frozenset(), 4,
                     before_stack=frozenset({"model.embed_tokens.weight"}))
NAMES = ["model.embed_tokens.weight", "model.norm.weight",
         *(f"model.layers.{i}.{p}.weight" for i in range(4) for p in ("mlp.up_proj", "input_layernorm"))]


def recipe_of(merges, models=("a", "b"), **extra):
    data = {"base": "base", "models": [{"name": m, "model": m} for m in models], "merges": merges, **extra}
    return validate_recipe(data, Path("."), check_paths=False)


# -- the layout: names only ----------------------------------------------------------------------
def test_a_stacked_layout_renumbers_layers_and_takes_the_outside_from_the_first_and_last_block():
    spec = recipe_of([{"name": "m", "method": "task_arithmetic", "layers": [{"range": [0, 1]}]}]).merges[0]
    settings = settings_of(spec.merge_blocks[0], [])
    layout = stacked(LLAMA, NAMES, [Block(1, 3, source=BASE), Block(0, 2, settings, (0, 1), (None, 2))])
    assert layout.depth == 4 and layout.origins == [1, 2, 0, 1]
    by = layout.by_name
    assert [o.name for o in layout.outputs][:3] == ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight",
                                                   "model.layers.0.input_layernorm.weight"]
    assert by["model.embed_tokens.weight"].block == 0 and by["model.norm.weight"].block == 1  # before / after
    assert by["model.layers.0.mlp.up_proj.weight"].reference == "model.layers.1.mlp.up_proj.weight"
    merged = by["model.layers.3.mlp.up_proj.weight"]
    assert merged.reference == "model.layers.1.mlp.up_proj.weight"  # the base's layer 0 + 1
    assert merged.inputs == ("model.layers.1.mlp.up_proj.weight", "model.layers.3.mlp.up_proj.weight")
    assert (merged.layer, merged.length) == (1, 2)  # its place in its block: gradients run over the block
    with pytest.raises(ValueError, match=r"layers.1.range: \[2, 5\] goes beyond the base's 4 layers"):
        stacked(LLAMA, NAMES, [Block(0, 2, source=BASE), Block(2, 5, source=BASE)])
    with pytest.raises(ValueError, match=r"layers.0.models: a range \[3, 5\] goes beyond"):
        stacked(LLAMA, NAMES, [Block(0, 2, settings, (0, 1), (None, 3))])


# -- the recipe ----------------------------------------------------------------------------------
def test_blocks_inherit_the_variants_method_parameters_and_models():
    merge = recipe_of([{"name": "m", "method": "ties", "density": 0.4, "models": [{"name": "a", "weight": 0.5}, "b"],
                        "layers": [{"range": [0, 2]}, {"range": [2, 4], "method": "dare_linear", "seed": 3},
                                   {"range": [0, 4], "method": "slerp", "models": ["b"], "t": [0, 1]},
                                   {"from": "a"}]}]).merges[0]
    first, second, third = merge.merge_blocks
    assert first.method == "ties" and first.params["density"] == 0.4 and first.model_params("a") == {"weight": 0.5}
    assert second.params["density"] == 0.4 and second.params["seed"] == 3  # density inherited: dare takes it
    assert third.model_names == ["b"] and third.params["t"] == [0, 1] and "density" not in third.params


@pytest.mark.parametrize("layers, message", [
    ([{"from": "c"}], "merges.0.layers.0.from: 'c' is neither base nor a model of this recipe"),
    ([{"from": "a", "models": ["b"]}], "merges.0.layers.0.from: a copied block takes no method or models"),
    ([{"from": "a", "density": 0.3}], "merges.0.layers.0.density: unknown field (a copied block takes: range, scale)"),
    ([{"from": "a", "scale": [{"filter": "mlp", "value": 200}]}], "merges.0.layers.0.scale.0.value: must be in"),
    ([{"range": [3, 1]}], "merges.0.layers.0.range: layers [first, end) with 0 <= first < end, got [3, 1]"),
    ([{"range": [0, 2], "models": [{"name": "a", "range": [1, 4]}]}],
     "merges.0.layers.0.models.0.range: [1, 4] has 3 layers, the block's range [0, 2] 2"),
    ([{"range": [0, 2], "t": 0.5}], "merges.0.layers.0.t: unknown field"),
    ([{"range": [0, 2], "method": "slerp", "models": ["a", "b"]}], "merges.0.layers.0.models: slerp"),
    ([{"range": [0, 2], "models": ["c"]}], "merges.0.layers.0.models.0: 'c' is not a model of this recipe"),
    ([{"range": [0, 2], "lambda": "auto"}], "merges.0.layers.0.lambda: a layer-stacking variant takes fixed values"),
    ([], "merges.0.layers: List should have at least 1 item"),
])
def test_a_bad_block_is_one_line_naming_it(tmp_path, layers, message):
    path = write_recipe(tmp_path / "r.yaml", "base", [{"name": "a", "model": "a"}, {"name": "b", "model": "b"}],
                        [{"name": "m", "method": "task_arithmetic", "layers": layers}])
    result = cli("validate", path, code=2)
    assert message in error_line(result), result.stderr


def test_stacking_refuses_what_needs_the_bases_shape(tmp_path):
    for extra, message in (({"output": "lora", "rank": 4}, "merges.0.layers: a LoRA adapter of the base keeps"),
                           ({"lambda": "auto"}, "merges.0.lambda: auto scores merges of the base's shape")):
        path = write_recipe(tmp_path / "r.yaml", "base", [{"name": "a", "model": "a"}],
                            [{"name": "m", "method": "task_arithmetic", "layers": [{"from": "a"}], **extra}])
        assert message in error_line(cli("validate", path, code=2))


# -- end to end ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stacking")
    make_llama(root / "base", seed=0, layers=4, tie=False)
    fine_tune(root / "base", root / "a", seed=1)
    fine_tune(root / "base", root / "b", seed=2)
    make_lora(root / "base", root / "lora", seed=3)
    make_llama(root / "tied", seed=5, layers=4, tie=True)
    fine_tune(root / "tied", root / "tied_ft", seed=6)
    return root


def stacking_recipe(tmp_path, models, layers, base="base", names=("a", "b", "lora"), **variant):
    return write_recipe(tmp_path / "r.yaml", str(models / base), [{"name": n, "model": str(models / n)} for n in names],
                        [{"name": "stack", "method": "task_arithmetic", "layers": layers, **variant}],
                        workspace=str(tmp_path / "ws"), output_dir=str(tmp_path / "out"))


def test_copied_and_merged_blocks_make_a_deeper_model_that_loads_and_generates(models, tmp_path):
    layers = [{"from": "a", "range": [0, 3]},
              {"from": "base", "range": [1, 2], "scale": [{"filter": "o_proj", "value": 0.0}]},
              {"range": [2, 4], "models": [{"name": "b", "weight": 0.5, "range": [0, 2]}, "lora"]}]
    recipe = stacking_recipe(tmp_path, models, layers)
    (result,) = json.loads(cli("--json", "merge", recipe).stdout)
    out = load_folder(Path(result["path"]))
    base, a, b = (load_folder(models / n) for n in ("base", "a", "b"))
    assert len([n for n in out if n.endswith("mlp.up_proj.weight")]) == 6
    config = json.loads((Path(result["path"]) / "config.json").read_text())
    assert config["num_hidden_layers"] == 6
    for i in range(3):  # copied as stored, renumbered
        assert torch.equal(out[f"model.layers.{i}.mlp.up_proj.weight"], a[f"model.layers.{i}.mlp.up_proj.weight"])
    assert torch.equal(out["model.embed_tokens.weight"], a["model.embed_tokens.weight"])  # the first block's
    assert not out["model.layers.3.self_attn.o_proj.weight"].any()  # scale 0 on the copy's o_proj
    assert torch.equal(out["model.layers.3.self_attn.q_proj.weight"], base["model.layers.1.self_attn.q_proj.weight"])
    # merged: the base's layer 2 + 0.5 (b's layer 0 - base's layer 2) + (the LoRA's layer 2 - base's layer 2)
    from mergecli.models.architecture import describe
    from mergecli.models.lora import LoraAdapter
    from mergecli.models.safetensors_io import Checkpoint

    arch, ckpt, adapter = describe(models / "base"), Checkpoint.open(models / "base"), LoraAdapter(models / "lora")
    for out_layer, in_layer in ((4, 2), (5, 3)):
        for part in ("self_attn.q_proj", "mlp.up_proj"):
            name, ref = f"model.layers.{out_layer}.{part}.weight", f"model.layers.{in_layer}.{part}.weight"
            tau_lora = adapter.delta(ref, ref, ckpt, arch) if part == "self_attn.q_proj" else 0
            b_name = f"model.layers.{in_layer - 2}.{part}.weight"
            expected = base[ref] + 0.5 * (b[b_name] - base[ref]) + tau_lora
            assert torch.allclose(out[name], expected, atol=1e-6), name
    head = base["lm_head.weight"] + 0.5 * (b["lm_head.weight"] - base["lm_head.weight"])
    assert torch.allclose(out["lm_head.weight"], head, atol=1e-6)  # the last block's, the same name in every model
    account = result["account"]
    assert set(account["passed_through"]) == {"a", "base"} and len(account["passed_through"]["a"]) == 1 + 3 * 9
    assert account["merged"] + sum(map(len, account["passed_through"].values())) + sum(
        map(len, account["copied"].values())) == len(out)
    card = (Path(result["path"]) / "README.md").read_text()
    assert "copied as stored from a (layer stacking)" in card
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(result["path"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(result["path"])
    assert len(model.model.layers) == 6
    generated = model.generate(**tokenizer("def f", return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > 2
    (again,) = json.loads(cli("--json", "merge", recipe).stdout)
    assert again["reused"] and again["key"] == result["key"]
    (moved,) = json.loads(cli("--json", "merge", recipe, "merges.0.layers.0.range=[0, 2]").stdout)
    assert not moved["reused"] and moved["key"] != result["key"]


def test_a_range_beyond_the_base_is_refused_before_any_work(models, tmp_path):
    recipe = stacking_recipe(tmp_path, models, [{"from": "a", "range": [0, 3]}, {"from": "b", "range": [2, 6]}])
    result = cli("merge", recipe, code=2)
    assert "merges.0.layers.1.range: [2, 6] goes beyond the base's 4 layers" in error_line(result)
    assert not (tmp_path / "out").exists() and not (tmp_path / "ws").exists()


def test_a_tied_model_stacked_keeps_one_embedding(models, tmp_path):
    recipe = stacking_recipe(tmp_path, models, [{"from": "base", "range": [0, 3]},
                                                {"from": "tied_ft", "range": [1, 4]}], base="tied", names=("tied_ft",))
    (result,) = json.loads(cli("--json", "merge", recipe).stdout)
    out, base, ft = (load_folder(p) for p in (Path(result["path"]), models / "tied", models / "tied_ft"))
    assert "lm_head.weight" not in out
    assert torch.equal(out["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert torch.equal(out["model.norm.weight"], ft["model.norm.weight"])  # after the stack: the last block's
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(result["path"])
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert len(model.model.layers) == 6
