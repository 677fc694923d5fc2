"""mergekit configs -> mergecli recipes: mergekit 0.1.5's defaults written out, parameters carried
unchanged, precedence levels flattened, and one RecipeError naming each key mergecli cannot honour."""

from pathlib import Path
from string import Template

import pytest
import yaml

from mergecli.errors import RecipeError
from mergecli.recipe.mergekit import is_mergekit_config, translate
from mergecli.models.architecture import Architecture
from mergecli.methods.schedule import resolve, resolve_first

LAYER_OF = Architecture("llama", {}, frozenset(), frozenset(), 4).layer_of


def at(setting, name: str):
    """The setting's value for a tensor of a 4-layer model."""
    return resolve(setting, name, LAYER_OF(name), 4)

CONFIGS = Path(__file__).parent / "mergekit_configs"
PATHS = {"base": "./base", "ft_a": "./ft_a", "ft_b": "./ft_b", "ft_c": "./ft_c", "ft_far": "./ft_far",
         "lora_c": "./lora_c", "ft_tok": "./ft_tok", "ft_vocab": "./ft_vocab"}


def load(name: str) -> dict:
    return yaml.safe_load(Template((CONFIGS / f"{name}.yml").read_text()).substitute(PATHS))


def run(data: dict, layers: int = 4):
    return translate(data, Path("/models"), layers_of=lambda ref: layers)


def merge_of(name: str) -> dict:
    return run(load(name)).recipe["merges"][0]


def test_detection():
    assert is_mergekit_config(load("ties"))
    assert not is_mergekit_config({"base": "x", "models": [], "merges": []})


def test_ties_example_keeps_gradients_filters_and_defaults():
    out = run(load("ties"))
    recipe = out.recipe
    assert recipe["base"] == "./base"
    assert recipe["models"] == [{"name": "ft_a", "model": "./ft_a"}, {"name": "ft_b", "model": "./ft_b"},
                                {"name": "ft_c", "model": "./ft_c"}]
    merge = recipe["merges"][0]
    assert merge == {
        "name": "ties", "method": "ties", "score": "magnitude", "topk": "tensor",
        "normalize": True, "rescale": "none", "lambda": 1.0,
        "models": [{"name": "ft_a", "weight": 1.0, "density": [1, 0.7, 0.1]},
                   {"name": "ft_b", "weight": [0, 0.3, 0.7, 1], "density": 0.5},
                   {"name": "ft_c", "weight": [{"filter": "mlp", "value": 0.5}, {"value": 0}], "density": 0.33}],
        "dtype": "float32"}
    assert any(n.startswith("parameters.int8_mask") for n in out.notes)


def test_bio_merge_unnormalised_float16():
    out = run(load("bio-merge"))
    merge = out.recipe["merges"][0]
    assert merge["normalize"] is False and merge["dtype"] == "float16"
    assert [m["density"] for m in merge["models"]] == [0.5, 0.5]
    assert any("computes in float32" in n for n in out.notes)


def test_density_defaults_to_one_as_in_mergekit():
    data = load("dare_ties")
    for model in data["models"]:
        del model["parameters"]["density"]
    merge = run(data).recipe["merges"][0]
    assert [m["density"] for m in merge["models"]] == [1.0, 1.0]
    assert merge["normalize"] is False and merge["rescale"] == "l1" and merge["score"] == "random"


def test_gradient_slerp_slices_become_models():
    out = run(load("gradient-slerp"))
    assert out.recipe["base"] == "./ft_a"
    assert out.recipe["models"] == [{"name": "ft_far", "model": "./ft_far"}]
    merge = out.recipe["merges"][0]
    assert merge["method"] == "slerp" and merge["models"] == ["ft_far"]
    t = merge["t"]
    assert at(t, "model.layers.0.self_attn.q_proj.weight") == 0
    assert at(t, "model.layers.3.mlp.up_proj.weight") == 0
    assert at(t, "model.layers.1.input_layernorm.weight") == 0.5


def test_passthrough_slices_become_copied_blocks():
    out = run(load("frankenmerge"))
    assert out.recipe["base"] == "./ft_a"  # no base_model: the first slice's source is the donor, as mergekit's
    assert out.recipe["models"] == [{"name": "ft_b", "model": "./ft_b"}]
    assert out.recipe["merges"][0] == {"name": "passthrough", "method": "passthrough", "dtype": "float32",
                                       "layers": [{"from": "base", "range": [0, 3]},
                                                  {"from": "ft_b", "range": [2, 4]}]}
    dus = run(load("depth-upscaling")).recipe
    assert dus["base"] == "./base" and dus["models"] == []  # the base twice: no fine-tune at all
    assert [b["range"] for b in dus["merges"][0]["layers"]] == [[0, 3], [1, 4]]
    expansion = run(load("block-expansion")).recipe["merges"][0]["layers"]
    assert "scale" not in expansion[0] and at(expansion[1]["scale"], "model.layers.1.self_attn.o_proj.weight") == 0
    whole = run(load("passthrough")).recipe
    assert whole["base"] == "./ft_a" and whole["merges"][0]["layers"] == [
        {"from": "base", "scale": [{"filter": "down_proj", "value": 0.5}, {"value": 1.0}]}]  # every layer


def test_merge_slices_become_merge_blocks_with_their_own_ranges_and_parameters():
    out = run(load("stacked-ties"))
    assert out.recipe["base"] == "./base"
    assert out.recipe["models"] == [{"name": "ft_a", "model": "./ft_a"}, {"name": "lora_c", "model": "./lora_c"}]
    merge = out.recipe["merges"][0]
    assert merge["method"] == "ties" and "models" not in merge
    first, second = merge["layers"]
    assert first["range"] == [0, 2] and first["models"] == [
        {"name": "ft_a", "weight": 1.0, "density": 0.5, "range": [2, 4]},
        {"name": "lora_c", "weight": 0.5, "density": 0.5, "range": [1, 3]}]  # the slice's density before the top's
    assert second["range"] == [1, 4] and second["models"][0] == {"name": "ft_a", "weight": 1.0, "density": 0.3}
    assert second["models"][1]["density"] == 0.7 and second["normalize"] is True
    slerp = run(load("stacked-slerp")).recipe["merges"][0]["layers"]
    assert slerp[0]["t"] == [{"filter": "self_attn", "value": [0, 1]}, {"value": 0.5}] and slerp[1]["t"] == 0.3
    assert slerp[1]["models"] == [{"name": "ft_far", "range": [1, 3]}]


def test_one_slice_of_whole_models_stays_a_merge_of_the_base_tensors():
    assert "layers" not in merge_of("gradient-slerp")
    partial = run(load("gradient-slerp"), layers=8).recipe["merges"][0]  # [0, 4] of 8 layers: a block
    assert partial["layers"][0]["range"] == [0, 4] and partial["layers"][0]["models"] == [{"name": "ft_far"}]


def test_slerp_models_syntax():
    merge = merge_of("slerp")
    assert merge["t"] == 0.5 and merge["models"] == ["ft_far"]


def test_linear_without_base_uses_first_model_as_reference():
    out = run(load("linear"))
    assert out.recipe["base"] == "./ft_a"
    merge = out.recipe["merges"][0]
    assert merge["method"] == "linear" and merge["normalize"] is True and merge["base_weight"] == 1.0
    assert merge["models"] == [{"name": "ft_b", "weight": 0.3}, {"name": "ft_c", "weight": 0.5}]


def test_linear_global_weight_applies_to_every_model_and_the_base():
    merge = run(load("linear-global-weight")).recipe["merges"][0]
    assert merge["name"] == "first-merge"
    assert merge["base_weight"] == 0.5 and merge["models"] == [{"name": "ft_a", "weight": 0.5}]


def test_task_arithmetic_with_lora_input():
    out = run(load("task_arithmetic"))
    assert out.recipe["models"] == [{"name": "ft_a", "model": "./ft_a"}, {"name": "lora_c", "model": "./lora_c"}]
    merge = out.recipe["merges"][0]
    assert merge == {"name": "task_arithmetic", "method": "task_arithmetic", "normalize": False, "lambda": 0.8,
                     "models": [{"name": "ft_a", "weight": 0.7}, {"name": "lora_c", "weight": 0.4}],
                     "dtype": "float32"}


def test_della_breadcrumbs_model_stock():
    della = merge_of("della")
    assert della["normalize"] is True and della["rescale"] == "l1" and "topk" not in della
    assert della["models"][1] == {"name": "ft_b", "weight": 0.8, "density": 0.4, "epsilon": 0.15}
    crumbs = merge_of("breadcrumbs")
    assert crumbs["normalize"] is False and crumbs["rescale"] == "none"
    assert crumbs["models"][0] == {"name": "ft_a", "weight": 1.0, "density": 0.9, "gamma": 0.01}
    crumbs_ties = merge_of("breadcrumbs_ties")
    assert crumbs_ties["method"] == "breadcrumbs_ties"
    assert at(crumbs_ties["models"][0]["gamma"], "model.layers.2.self_attn.v_proj.weight") == 0.05
    stock = merge_of("model_stock")
    assert stock == {"name": "model_stock", "method": "model_stock", "filter_wise": False,
                     "models": ["ft_a", "ft_b", "ft_c"], "dtype": "float32"}


def test_precedence_levels_flatten_to_the_same_values():
    data = {"merge_method": "ties", "base_model": "./base",
            "slices": [{"sources": [{"model": "./base", "layer_range": [0, 4]},
                                    {"model": "./ft_a", "layer_range": [0, 4],
                                     "parameters": {"weight": [{"filter": "mlp", "value": 0.25}]}},
                                    {"model": "./ft_b", "layer_range": [0, 4]}],
                        "parameters": {"weight": [{"filter": "self_attn", "value": [0.1, 0.9]}]}}],
            "parameters": {"weight": 1.0, "density": 0.5}}
    merge = run(data).recipe["merges"][0]
    levels = [[{"filter": "mlp", "value": 0.25}], [{"filter": "self_attn", "value": [0.1, 0.9]}], 1.0]
    for name in ("model.layers.0.mlp.up_proj.weight", "model.layers.3.self_attn.q_proj.weight",
                 "model.layers.2.input_layernorm.weight", "model.embed_tokens.weight"):
        assert at(merge["models"][0]["weight"], name) == resolve_first(levels, name, LAYER_OF(name), 4)
        assert at(merge["models"][1]["weight"], name) == resolve_first(levels[1:], name, LAYER_OF(name), 4)


def test_relative_paths_rebased_for_the_recipe_folder(tmp_path):
    (tmp_path / "models" / "base").mkdir(parents=True)
    (tmp_path / "models" / "ft").mkdir()
    data = {"merge_method": "task_arithmetic", "base_model": "./base",
            "models": [{"model": "./ft", "parameters": {"weight": 1.0}}]}
    out = translate(data, tmp_path / "models", dest=tmp_path / "recipes")
    assert out.recipe["base"] == "../models/base"
    assert out.recipe["models"][0]["model"] == "../models/ft"
    hub = translate({"merge_method": "task_arithmetic", "base_model": "org/base@v1",
                     "models": [{"model": "org/ft", "parameters": {"weight": 1.0}}]}, tmp_path, dest=tmp_path / "x")
    assert hub.recipe["base"] == "org/base@v1" and hub.recipe["models"][0]["model"] == "org/ft"


def test_tokenizer_settings_become_the_recipes_tokenizer():
    assert run(load("ties") | {"tokenizer_source": "base"}).recipe["tokenizer"] == {"source": "base"}
    assert run(load("ties") | {"tokenizer_source": "./ft_b"}).recipe["tokenizer"] == {"source": "ft_b"}
    assert run(load("ties") | {"tokenizer": {}}).recipe["tokenizer"] == {"source": "union"}  # mergekit's default
    assert run(load("ties") | {"chat_template": "chatml"}).recipe["tokenizer"] == {"chat_template": "chatml"}
    assert "tokenizer" not in run(load("ties")).recipe
    out = run(load("tokenizer-tokens")).recipe["tokenizer"]
    assert out == {"source": "ft_tok", "pad_to_multiple_of": 32, "chat_template": "chatml",
                   "tokens": {"<|im_end|>": {"source": {"model": "ft_tok", "token": "</s>"}, "force": True},
                              "<|new|>": {"source": "zero"}}}
    rule = run(load("ties") | {"tokenizer": {"tokens": {"<x>": {"source": "./base"},
                                                         "<y>": {"source": {"kind": "model_token", "model": "./ft_a",
                                                                            "token_id": 3}}}}})
    assert rule.recipe["tokenizer"]["tokens"] == {"<x>": {"source": "base"},
                                                  "<y>": {"source": {"model": "ft_a", "token_id": 3}}}


def _with(name: str, **changes):
    data = load(name)
    data.update(changes)
    return data


@pytest.mark.parametrize("data, key", [
    (_with("ties", merge_method="frankenmerge"), "merge_method: 'frankenmerge' is not supported"),
    (_with("ties", merge_method="passthrough"), "models: mergekit's passthrough copies exactly one model per output "
                                                "slice, got 3"),
    (_with("passthrough", base_model="./base"), "models: mergekit's passthrough takes one input and adds base_model"),
    (_with("passthrough", models=[{"model": "./ft_a", "parameters": {"weight": 1}}]),
     "models.0.parameters.weight: not a parameter of mergekit's passthrough"),
    (_with("ties", tokenizer_source="./elsewhere"), "tokenizer_source: './elsewhere' is neither base_model nor a model"),
    (_with("ties", tokenizer_source="union", tokenizer={"source": "base"}), "tokenizer: give tokenizer or "),
    (_with("ties", tokenizer={"source": "base", "tokens": {"<x>": {"force": True}}}), "tokenizer.tokens.<x>.source: "
                                                                                      "required"),
    (_with("ties", tokenizer={"tokens": {"<x>": {"source": {"kind": "mean"}}}}),
     "tokenizer.tokens.<x>.source.kind: expected model_token or zero"),
    (_with("ties", tokenizer={"source": "union", "pad": 8}), "tokenizer.pad: not a mergekit tokenizer key"),
    (_with("ties", chat_template="chatm"), "chat_template: 'chatm' is neither a built-in template"),
    (_with("ties", modules={"text_decoder": {}}), "modules"),
    (_with("ties", dtype="float64"), "dtype: 'float64'"),
    (_with("ties", base_model=None), "base_model: required by mergekit's ties"),
    (_with("ties", densty=0.5), "densty: not a mergekit config key"),
    (_with("ties", parameters={"densty": 0.5}), "parameters.densty: not a parameter of mergekit's ties"),
    (_with("ties", parameters={"t": 0.5}), "parameters.t: not a parameter of mergekit's ties"),
    (_with("slerp", parameters={}), "parameters.t: required by mergekit's slerp"),
    (_with("slerp", models=[{"model": "./ft_b"}, {"model": "./ft_far"}]), "needs exactly 1 model"),
    (_with("model_stock", models=[{"model": "./ft_a"}]), "needs at least 2 model"),
    (_with("dare_ties", models=[{"model": "./ft_a", "parameters": {"density": 0.5}}]),
     "models.0.parameters.weight: required"),
    (_with("dare_ties", models=[{"model": "./ft_a", "parameters": {"weight": 1, "lambda": 2}}]),
     "models.0.parameters.lambda: mergekit reads 'lambda' only from the top-level"),
    (_with("dare_ties", models=[{"model": "./ft_a", "parameters": {"weight": 1, "density": 1.5}}]),
     "models.0.parameters.density: density 1.5 outside"),
    (_with("dare_ties", models=[{"model": "./ft_a", "parameters": {"weight": "heavy"}}]),
     "models.0.parameters.weight: expected numbers"),
    (_with("ties", parameters={"normalize": [True, False]}), "parameters.normalize: expected true or false"),
    (_with("dare_ties", models=[{"model": "./ft_a", "parameters": {"weight": 1}},
                                {"model": "./ft_a", "parameters": {"weight": 1}}]), "listed twice"),
    (_with("task_arithmetic", models=[{"model": "./other+./lora_c", "parameters": {"weight": 1}}]),
     "models.0.model: './other+./lora_c' applies a LoRA to './other'"),
    (_with("gradient-slerp", slices=[{"sources": [{"model": "./ft_a", "layer_range": [0, 2]},
                                                  {"model": "./ft_far", "layer_range": [0, 3]}]}]),
     "slices.0.sources.1.layer_range: [0, 3] has 3 layers, the slice's first source 2"),
    (_with("gradient-slerp", slices=[{"sources": [{"model": "./ft_a", "layer_range": [2, 2]}]}]),
     "slices.0.sources.0.layer_range: expected [first, end] with 0 <= first < end, got [2, 2]"),
    (_with("gradient-slerp", slices=[{"sources": [{"model": "./ft_a", "layer_range": [0, 2]},
                                                  {"model": "./ft_far", "layer_range": [0, 2]}]},
                                     {"sources": [{"model": "./ft_b", "layer_range": [2, 4]},
                                                  {"model": "./ft_far", "layer_range": [2, 4]}]}]),
     "slices.1.sources: base_model './ft_a' is not among this slice's sources, and mergekit's slerp needs it"),
    (_with("linear", slices=[{"sources": [{"model": "./ft_a", "layer_range": [0, 2], "parameters": {"weight": 1}},
                                          {"model": "./ft_b", "layer_range": [0, 2], "parameters": {"weight": 1}}]},
                             {"sources": [{"model": "./ft_b", "layer_range": [2, 4], "parameters": {"weight": 1}},
                                          {"model": "./ft_a", "layer_range": [2, 4], "parameters": {"weight": 1}}]}],
           models=None),
     "slices.1.sources: './ft_b' plays the base's part in this slice and './ft_a' in the first"),
    (_with("gradient-slerp", slices=[{"sources": [{"model": "./ft_a", "layer_range": [0, 4]}],
                                      "residual_weight": 0.5}]), "slices.0.residual_weight: not supported"),
    (_with("ties", models=[{"model": "./ft_a", "parameters": {"weight": 1}, "lora": "x"}]),
     "models.0.lora: not a mergekit key here"),
])
def test_unsupported_keys_are_one_error_naming_the_key(data, key):
    with pytest.raises(RecipeError) as info:
        run(data)
    assert key in str(info.value)


def test_linear_with_added_base_needs_a_global_weight():
    data = _with("linear", base_model="./base")
    with pytest.raises(RecipeError, match="parameters.weight: mergekit's linear averages the base_model in too"):
        run(data)
    data["parameters"] = {"weight": 0.2}
    merge = run(data).recipe["merges"][0]
    assert merge["base_weight"] == 0.2 and len(merge["models"]) == 3


def test_inert_keys_are_dropped_with_a_note():
    data = _with("task_arithmetic", parameters={"lambda": 0.8, "rescale": True})
    data["models"][1]["parameters"]["density"] = 0.5
    out = run(data)
    merge = out.recipe["merges"][0]
    assert "rescale" not in merge and all("density" not in m for m in merge["models"])
    assert any(n.startswith("parameters.rescale") for n in out.notes)
    assert any(n.startswith("models.1.parameters.density") for n in out.notes)


def test_every_method_maps_to_a_registered_method_with_a_known_base_mode():
    from mergecli.methods import catalog
    from mergecli.recipe.mergekit import BASE_MODES, METHODS

    for name, method in METHODS.items():
        assert method.base in BASE_MODES and method.mergecli in catalog(), name
        params = {p.name for p in catalog()[method.mergecli].params} | {"weight"}
        assert (set(method.shared) | set(method.per_model) | set(method.fixed)) - method.inert <= params, name
    assert "passthrough" not in METHODS  # translated on its own: copied blocks, no method parameters
    covered = {yaml.safe_load(path.read_text())["merge_method"] for path in CONFIGS.glob("*.yml")}
    assert covered == set(METHODS) | {"passthrough"}  # every translated method has a config the CLI tests run


def test_every_fixture_translates_to_a_valid_recipe():
    from mergecli.recipe.load import validate_recipe

    for path in sorted(CONFIGS.glob("*.yml")):
        out = run(load(path.stem))
        recipe = validate_recipe(out.recipe, Path("/models"), check_paths=False)  # the methods' rules included
        assert recipe.merges[0].method == out.recipe["merges"][0]["method"]


def test_import_config_file(tmp_path):
    from mergecli.recipe.mergekit import import_config

    (tmp_path / "models" / "base").mkdir(parents=True)
    (tmp_path / "models" / "ft").mkdir()
    config = tmp_path / "models" / "ta.yml"
    config.write_text("merge_method: task_arithmetic\nbase_model: ./base\nmodels:\n"
                      "  - model: ./ft\n    parameters: {weight: 0.5}\n")
    out = import_config(config, dest=tmp_path)
    assert out.recipe["base"] == "models/base" and out.recipe["models"][0]["model"] == "models/ft"
    multi = tmp_path / "multi.yml"
    multi.write_text(config.read_text() + "---\n" + config.read_text())
    with pytest.raises(RecipeError, match=r"a multi-stage file \(2 documents\); run it as it is"):
        import_config(multi)
    broken = tmp_path / "broken.yml"
    broken.write_text("merge_method: [ties\n")
    with pytest.raises(RecipeError, match="YAML syntax error"):
        import_config(broken)


def test_numeric_strings_become_numbers_and_errors_name_the_level():
    data = _with("dare_ties", parameters={"density": ["1e-1", 0.5]})
    for model in data["models"]:
        del model["parameters"]["density"]
    merge = run(data).recipe["merges"][0]
    assert merge["models"][0]["density"] == [0.1, 0.5]
    with pytest.raises(RecipeError, match=r"^parameters\.density: density 0 outside"):
        run(_with("dare_ties", parameters={"density": [0, 0.5]}))
    with pytest.raises(RecipeError, match=r"^models\.0\.parameters\.weight: required by mergekit's linear"):
        run(_with("linear", models=[{"model": "./ft_a"}, {"model": "./ft_b", "parameters": {"weight": 1}}]))


# -- mergekit 0.1.5's nuslerp, multislerp, karcher, sce, nearswap, arcee_fusion, ram, ramplus_tl -------
def test_nuslerp_with_a_base_merges_task_vectors_and_without_one_the_weights():
    merge = merge_of("nuslerp")
    assert merge == {"name": "nuslerp", "method": "nuslerp", "nuslerp_flatten": True, "nuslerp_row_wise": False,
                     "origin": "base", "models": [{"name": "ft_a", "weight": 0.4}, {"name": "ft_b", "weight": 0.6}],
                     "dtype": "float32"}
    out = run(load("nuslerp-nobase"))  # the first model is the recipe's base; its weight, base_weight
    assert out.recipe["base"] == "./ft_a" and out.recipe["models"] == [{"name": "ft_far", "model": "./ft_far"}]
    merge = out.recipe["merges"][0]
    assert merge["origin"] == "zero" and merge["models"][0]["name"] == "ft_far"
    name = "model.layers.1.self_attn.q_proj.weight"  # layer 1 of 4: 1/3 along [1, 0.5, 0.7, 0.3, 0]
    assert at(merge["base_weight"], name) == pytest.approx(0.5 + (0.7 - 0.5) / 3 * 1)
    assert at(merge["models"][0]["weight"], name) == pytest.approx(0.5 + (0.3 - 0.5) / 3 * 1)
    columns = merge_of("nuslerp-columns")
    assert columns["nuslerp_flatten"] is False and columns["nuslerp_row_wise"] is True


def test_multislerp_origin_and_its_options():
    merge = merge_of("multislerp")
    assert merge["origin"] == "base" and merge["normalize_weights"] is True and merge["eps"] == 1e-8
    assert merge["models"][2] == {"name": "ft_c", "weight": [0.2, 0.8]}
    out = run(load("multislerp-nobase"))
    merge = out.recipe["merges"][0]
    assert out.recipe["base"] == "./ft_a" and merge["origin"] == "zero" and merge["base_weight"] == 0.5
    assert merge["normalize_weights"] is False and [m["weight"] for m in merge["models"]] == [0.3, 0.2]


@pytest.mark.parametrize("config, base, models", [
    ("karcher", "./ft_a", ["ft_b", "ft_far"]),  # no base_model: the first model is the first point
    ("karcher-base", "./ft_a", ["ft_c", "base"]),  # base_model not listed: mergekit appends it, the last point
])
def test_karcher_points_are_mergekits_inputs_in_order(config, base, models):
    out = run(load(config))
    merge = out.recipe["merges"][0]
    assert out.recipe["base"] == base and merge["models"] == models and merge["origin"] == "zero"
    assert "base_weight" not in merge and "weight" not in str(merge["models"])  # equal weights, as mergekit
    listed = _with("karcher-base", models=[{"model": "./ft_a"}, {"model": "./base"}, {"model": "./ft_c"}])
    assert run(listed).recipe["merges"][0]["models"] == ["base", "ft_c"]  # listed: its place is kept


def test_karcher_sce_nearswap_arcee_fusion_ram_parameters():
    karcher = merge_of("karcher")
    assert karcher["max_iter"] == 20 and karcher["tol"] == 1e-7  # YAML's string '1e-7', read as a number
    out = run(load("sce-all"))
    assert out.recipe["merges"][0] == {"name": "sce", "method": "sce", "select_topk": 1.0,
                                       "models": ["ft_a", "ft_b", "ft_c"], "dtype": "float32"}
    assert any(n.startswith("parameters.int8_mask") for n in out.notes)
    assert merge_of("sce")["select_topk"] == 0.3 and merge_of("sce")["models"][2] == "lora_c"
    assert merge_of("nearswap")["t"] == [0.001, 0.01, 0.02]
    out = run(load("arcee_fusion"))  # model_a is the base_model: the other is the one model
    assert out.recipe["base"] == "./ft_a" and out.recipe["merges"][0]["models"] == ["ft_b"]
    assert merge_of("ram")["epsilon"] == 0.015
    plus = merge_of("ramplus_tl")
    assert (plus["r"], plus["alpha"], plus["epsilon"]) == (0.5, 0.8, 0.02)
    defaults = run(_with("ramplus_tl", parameters={})).recipe["merges"][0]
    assert (defaults["r"], defaults["alpha"], defaults["epsilon"]) == (0.1, 0.2, 1e-5)


THREE = [{"model": "./ft_a", "parameters": {"weight": 1}}, {"model": "./ft_b", "parameters": {"weight": 1}},
         {"model": "./ft_c", "parameters": {"weight": 1}}]


@pytest.mark.parametrize("data, message", [
    (_with("nuslerp", models=THREE), "models: mergekit's nuslerp needs exactly 2 model(s) besides the base, got 3"),
    (_with("nuslerp-nobase", models=THREE), "models: mergekit's nuslerp needs exactly 2 models without a base_model, "
                                            "got 3"),
    (_with("multislerp-nobase", models=THREE[:1]),
     "models: mergekit's multislerp needs at least 2 models without a base_model, got 1 (one model alone would be "
     "returned unchanged)"),
    (_with("karcher", models=[{"model": "./ft_a"}]),
     "models: mergekit's karcher needs at least 2 input models (base_model included), got 1"),
    (_with("nearswap", models=[{"model": "./ft_a"}, {"model": "./ft_b"}]),
     "models: mergekit's nearswap needs exactly 1 model(s) besides the base, got 2"),
    (_with("arcee_fusion", models=[{"model": "./ft_a"}, {"model": "./ft_b"}, {"model": "./ft_c"}]),
     "models: mergekit's arcee_fusion needs exactly 1 model(s) besides the base, got 2"),
    (_with("nuslerp-rows", models=[{"model": "./ft_a"}, {"model": "./ft_far", "parameters": {"weight": 1}}]),
     "models.0.parameters.weight: required by mergekit's nuslerp (it has no default)"),
    (_with("nuslerp", models=[{"model": "./ft_a", "parameters": {"weight": 1}}, {"model": "./ft_b"}]),
     "models.1.parameters.weight: required by mergekit's nuslerp"),
    (_with("nearswap", parameters={}), "parameters.t: required by mergekit's nearswap"),
    (_with("sce", base_model=None), "base_model: required by mergekit's sce"),
    (_with("ram", base_model=None), "base_model: required by mergekit's ram"),
    (_with("sce", parameters={"select_topk": 0.3, "density": 0.5}), "parameters.density: not a parameter of "
                                                                     "mergekit's sce"),
    (_with("karcher", models=[{"model": "./ft_a", "parameters": {"weight": 2}}, {"model": "./ft_b"}]),
     "models.0.parameters.weight: not a parameter of mergekit's karcher"),
    (_with("nuslerp", parameters={"nuslerp_flatten": "no"}), "parameters.nuslerp_flatten: expected true or false"),
    (_with("multislerp", parameters={"normalize_weights": [True]}),
     "parameters.normalize_weights: expected true or false"),
])
def test_new_methods_refuse_what_mergekit_refuses_naming_the_key(data, message):
    with pytest.raises(RecipeError) as info:
        run(data)
    assert message in str(info.value)
