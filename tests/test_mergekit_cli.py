"""mergekit configs through the CLI as they are (`mergecli merge config.yml`), `recipes import`,
per-tensor schedules in recipes, and the new methods end to end on tiny local models.

Every mergekit example config's output is compared with `mergekit_oracle` (the translated
settings resolved per tensor and mergecli's pure functions composed directly, without the
pipeline); `test_mergekit_slow.py` compares with mergekit itself.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from helpers import cli, digests, error_line, make_lora, write_recipe
from mergekit_oracle import CONFIGS, build_models, load_folder, reference_merge, render
from mergecli.recipe.mergekit import import_config

CONFIG_NAMES = sorted(p.stem for p in CONFIGS.glob("*.yml"))


@pytest.fixture(scope="module")
def mk_models(tmp_path_factory) -> dict[str, Path]:
    return build_models(tmp_path_factory.mktemp("mergekit"))


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_mergekit_config_merges_as_the_oracle_says(mk_models, tmp_path, name):
    config = render(name, mk_models, tmp_path)
    result = cli("merge", config)
    assert "not in mergekit configs" in result.stderr  # the translation's notes are log lines
    (merged,) = json.loads(cli("--json", "merge", config).stdout)  # a second run reuses the folder
    recipe = import_config(config).recipe
    expected_name = yaml.safe_load(config.read_text()).get("name", name)  # the config's name, else its file's
    assert merged["reused"] and Path(merged["path"]) == tmp_path / "merged" / expected_name
    ours = load_folder(Path(merged["path"]))
    vocabulary = None
    if (recipe.get("tokenizer") or {}).get("source"):  # rows re-mapped to the merged vocabulary, as written
        from transformers import AutoTokenizer

        vocabulary = AutoTokenizer.from_pretrained(merged["path"]).get_vocab()
    expected = reference_merge(recipe, tmp_path, vocabulary=vocabulary)
    dtype = getattr(torch, recipe["merges"][0].get("dtype", "float32"))
    assert set(ours) == set(expected)
    for tensor, value in expected.items():
        assert ours[tensor].dtype == dtype
        assert torch.allclose(ours[tensor].float(), value.to(dtype).float(), rtol=2e-3 if dtype != torch.float32 else 0,
                              atol=2e-6), f"{name}: {tensor}"


def _set(path: str, value):
    def change(data: dict) -> dict:
        *parents, last = path.split(".")
        node = data
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        node[last] = value
        return data
    return change


def _uneven_slice(data: dict) -> dict:
    base, model = data["base_model"], data["models"][0]["model"]
    return {"merge_method": "slerp", "base_model": base, "parameters": {"t": 0.5},
            "slices": [{"sources": [{"model": base, "layer_range": [0, 2]}, {"model": model, "layer_range": [0, 3]}]}]}


BAD = [
    ("passthrough-of-three", _set("merge_method", "passthrough"),
     "models: mergekit's passthrough copies exactly one model per output slice, got 3"),
    ("unknown-method", _set("merge_method", "frankenmerge"), "merge_method: 'frankenmerge' is not supported"),
    ("unknown-key", _set("merge_methods", "ties"), "merge_methods: not a mergekit config key"),
    ("unknown-template", _set("chat_template", "chatm"), "chat_template: 'chatm' is neither a built-in template"),
    ("per-model-lambda", _set("models.0.parameters.lambda", 0.5),
     "models.0.parameters.lambda: mergekit reads 'lambda'"),
    ("misspelt-parameter", _set("models.0.parameters.densty", 0.5), "models.0.parameters.densty: not a parameter"),
    ("density-out-of-range", _set("models.1.parameters.density", 1.5), "models.1.parameters.density: density 1.5"),
    ("uneven-slice", _uneven_slice, "slices.0.sources.1.layer_range: [0, 3] has 3 layers, the slice's first source 2"),
    ("duplicate-key", None, "key 'merge_method' is given twice"),
]


@pytest.mark.parametrize("case,change,message", BAD, ids=[b[0] for b in BAD])
def test_a_bad_mergekit_config_is_one_line_exit_2_and_nothing_written(mk_models, tmp_path, case, change, message):
    config = render("ties", mk_models, tmp_path)
    if change is None:
        config.write_text(config.read_text() + "merge_method: ties\n")
    else:
        config.write_text(yaml.safe_dump(change(yaml.safe_load(config.read_text()))))
    before = digests(tmp_path)
    for command in (["validate"], ["merge"], ["recipes", "import"]):
        result = cli(*command, config, code=2)
        assert message in error_line(result), result.stderr
    assert digests(tmp_path) == before


@pytest.mark.parametrize("name, weights, message", [
    ("nuslerp", [1.0, -0.95], "merges.0.weight: the weights 1, -0.95 sum to 0.05; their weighted mean can be 39 "
                              "times the largest task-vector entry (at most 10 is allowed): use weights whose sums "
                              "stay away from 0, or weights of one sign"),
    ("multislerp", [1.0, 0.5, -1.45], "merges.0.weight: the weights 1, 0.5, -1.45 sum to 0.05"),
])
def test_spherical_weights_summing_near_zero_are_refused_before_any_work(mk_models, tmp_path, name, weights, message):
    config = render(name, mk_models, tmp_path)
    data = yaml.safe_load(config.read_text())
    for model, weight in zip(data["models"], weights):
        model["parameters"]["weight"] = weight
    config.write_text(yaml.safe_dump(data))
    for command in ("validate", "merge"):
        assert message in error_line(cli(command, config, code=2))
    data["models"][-1]["parameters"]["weight"] = [0.5, weights[-1]]  # broken in the last layer only: merge finds it
    config.write_text(yaml.safe_dump(data))
    cli("validate", config)
    result = error_line(cli("merge", config, code=2))
    assert "merges.0.weight: the weights" in result and "(for tensor model.layers.3." in result
    assert not (tmp_path / "merged").exists() and not (tmp_path / "workspace").exists()


def test_recipes_import_writes_an_equivalent_recipe_and_refuses_to_overwrite(mk_models, tmp_path):
    config = render("ties", mk_models, tmp_path)
    elsewhere = tmp_path / "imported" / "recipe.yaml"
    elsewhere.parent.mkdir()
    cli("recipes", "import", config, "-o", elsewhere)
    moved = yaml.safe_load(elsewhere.read_text())  # relative paths rewritten for the recipe's folder
    assert (elsewhere.parent / moved["base"]).resolve() == mk_models["base"].resolve()
    out = tmp_path / "recipe.yaml"
    cli("recipes", "import", config, "-o", out)
    imported = yaml.safe_load(out.read_text())
    assert imported["merges"][0]["name"] == "ties" and imported["merges"][0]["method"] == "ties"
    printed = cli("-q", "recipes", "import", config).stdout  # no -o: printed
    assert yaml.safe_load(printed)["merges"] == imported["merges"]
    result = cli("recipes", "import", config, "-o", out, code=1)
    assert "already exists" in result.stderr
    result = cli("recipes", "import", config, "-o", mk_models["base"] / "recipe.yaml", code=1)
    assert "never writes into its inputs" in result.stderr
    assert not (mk_models["base"] / "recipe.yaml").exists()
    # the config and the imported recipe are the same merge: same key, so the second run reuses
    (from_config,) = json.loads(cli("--json", "merge", config, f"output_dir={tmp_path / 'out'}").stdout)
    (from_recipe,) = json.loads(cli("--json", "merge", out, f"output_dir={tmp_path / 'out'}").stdout)
    assert from_recipe["key"] == from_config["key"] and from_recipe["reused"]


# -- schedules in mergecli recipes ---------------------------------------------------------------
@pytest.fixture
def slerp_recipe(mk_models, tmp_path):
    t = [{"filter": "mlp", "value": [0.0, 1.0]}, {"value": 0.5}]
    models = [{"name": "far", "model": str(mk_models["ft_far"])}]
    return write_recipe(tmp_path / "recipe.yaml", str(mk_models["base"]), models,
                        [{"name": "s", "method": "slerp", "t": t}])


def test_a_gradient_change_merges_again(slerp_recipe, mk_models):
    (first,) = json.loads(cli("--json", "merge", slerp_recipe).stdout)
    (same,) = json.loads(cli("--json", "merge", slerp_recipe).stdout)
    (changed,) = json.loads(cli("--json", "merge", slerp_recipe, "merges.0.t=[{filter: mlp, value: [0.2, 1.0]}, "
                                    "{value: 0.5}]").stdout)
    assert same["reused"] and not changed["reused"] and changed["key"] != first["key"]
    merged = load_folder(Path(changed["path"]))
    base, far = load_folder(mk_models["base"]), load_folder(mk_models["ft_far"])
    from mergecli.methods.interpolate import slerp

    up = "model.layers.1.mlp.up_proj.weight"  # layer 1 of 4: t = 0.2 + (1/3) 0.8
    assert torch.allclose(merged[up], slerp(base[up], far[up], 0.2 + 0.8 / 3), atol=2e-6)
    q = "model.layers.1.self_attn.q_proj.weight"  # no filter matches but the fallback: t = 0.5
    assert torch.allclose(merged[q], slerp(base[q], far[q], 0.5), atol=2e-6)


@pytest.mark.parametrize("override,message", [
    ("merges.0.t=[{filter: mlp, value: [0, 2]}]", "merges.0.t.0.value.1: must be in [0, 1], got 2"),
    ("merges.0.t=[0.1, x]", "merges.0.t.1: must be a number, got 'x'"),
    ("models.0.weight=[{filter: mlp}]", "models.0.weight.0: missing 'value'"),
    ("merges.0.output=lora", "merges.0.rank: required with output: lora"),
    ("merges.0.rank=4", "merges.0.rank: only with output: lora"),
])
def test_schedule_errors_name_their_place(slerp_recipe, override, message):
    result = cli("validate", slerp_recipe, override, code=2)
    assert message in result.stderr, result.stderr


def test_a_rule_broken_in_one_layer_is_found_before_any_work(mk_models, tmp_path):
    models = [{"name": "a", "model": str(mk_models["ft_a"])}, {"name": "b", "model": str(mk_models["ft_b"])}]
    recipe = write_recipe(tmp_path / "r.yaml", str(mk_models["base"]), models,
                          [{"name": "t", "method": "ties", "models": [{"name": "a", "weight": [1.0, -1.0]},
                                                                      {"name": "b", "weight": [1.0, 0.5]}]}])
    result = cli("merge", recipe, code=2)
    assert "merges.0.weight: the models' weights sum to -0.5" in result.stderr
    assert "(for tensor model.layers.3." in result.stderr
    assert not (tmp_path / "ws").exists() and not (tmp_path / "out").exists()


def test_per_model_weight_gradients_reach_each_tensor(mk_models, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", str(mk_models["base"]),
                          [{"name": "a", "model": str(mk_models["ft_a"]), "weight": [0.0, 1.0]},
                           {"name": "b", "model": str(mk_models["ft_b"])}],
                          [{"name": "ta", "method": "task_arithmetic",
                            "models": ["a", {"name": "b", "weight": [{"regex": r"layers\.[01]\.", "value": 2.0}]}]}])
    (merged,) = json.loads(cli("--json", "merge", recipe).stdout)
    out, base = load_folder(Path(merged["path"])), load_folder(mk_models["base"])
    a, b = load_folder(mk_models["ft_a"]), load_folder(mk_models["ft_b"])
    for layer, (wa, wb) in {0: (0.0, 2.0), 2: (2 / 3, 1.0), 3: (1.0, 1.0)}.items():
        name = f"model.layers.{layer}.mlp.down_proj.weight"
        expected = base[name] + wa * (a[name] - base[name]) + wb * (b[name] - base[name])
        assert torch.allclose(out[name], expected, atol=1e-6), layer
    card = (Path(merged["path"]) / "README.md").read_text()
    assert "| a | " in card and "[0.0, 1.0]" in card


# -- LoRA out ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_adapters(mk_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    make_lora(mk_models["base"], root / "lora_a", seed=11)
    make_lora(mk_models["base"], root / "lora_b", seed=12, targets=("q_proj", "v_proj", "down_proj"))
    return root


def lora_recipe(tmp_path, mk_models, adapters, **variant):
    return write_recipe(tmp_path / "r.yaml", str(mk_models["base"]),
                        [{"name": "a", "model": str(adapters / "lora_a"), "weight": 0.6},
                         {"name": "b", "model": str(adapters / "lora_b"), "weight": 0.9}],
                        [{"name": "full", "method": "task_arithmetic"},
                         {"name": "adapter", "method": "task_arithmetic", **variant}])


def peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base).eval(), str(adapter))
    return {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}


def test_lora_out_at_full_rank_is_the_merged_model(mk_models, two_adapters, tmp_path):
    recipe = lora_recipe(tmp_path, mk_models, two_adapters, output="lora", rank=8)
    result = cli("--json", "merge", recipe)
    full, adapter = json.loads(result.stdout)
    assert adapter["output"] == "lora" and adapter["adapter"]["rank"] == 8
    modules = adapter["adapter"]["modules"]
    assert set(modules) == {f"model.layers.{i}.{m}" for i in range(4)
                            for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")}
    assert all(m["energy_kept"] == pytest.approx(1.0, abs=1e-6) for m in modules.values())  # rank <= 4 + 4
    folder = Path(adapter["path"])
    stamp = json.loads((folder / "mergecli.json").read_text())
    assert stamp["kind"] == "merged-lora" and stamp["result"]["adapter"] == adapter["adapter"]
    card = (folder / "README.md").read_text()
    assert "library_name: peft" in card and "LoRA rank 8" in card
    merged, expected = peft_merged(mk_models["base"], folder), load_folder(Path(full["path"]))
    for name, value in expected.items():
        assert torch.allclose(merged[name], value, atol=1e-6), name
    logged = cli("merge", recipe, "merges.adapter.rank=3").stderr  # a new rank is a new adapter
    assert all(f"merge adapter: {module}: lora rank 3, energy kept" in logged for module in modules), logged


def test_lora_out_below_full_rank_is_within_eckart_young(mk_models, two_adapters, tmp_path):
    recipe = lora_recipe(tmp_path, mk_models, two_adapters, output="lora", rank=2)
    full, adapter = json.loads(cli("--json", "merge", recipe).stdout)
    base, expected = load_folder(mk_models["base"]), load_folder(Path(full["path"]))
    merged = peft_merged(mk_models["base"], Path(adapter["path"]))
    for module, report in adapter["adapter"]["modules"].items():
        name = f"{module}.weight"
        sigma = torch.linalg.svdvals((expected[name] - base[name]).double())
        dropped = float(sigma[2:].square().sum())
        error = float((merged[name] - expected[name]).double().square().sum())
        assert error == pytest.approx(dropped, rel=1e-3, abs=1e-10), name
        assert report["energy_kept"] == pytest.approx(1 - dropped / float(sigma.square().sum()), abs=1e-5)
    untouched = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(merged[untouched], base[untouched])
    shutil.rmtree(tmp_path / "ws")
