"""Per-tensor parameter schedules, against values worked out by hand from mergekit 0.1.5's rules:
t = layer / (L - 1) inside the layer stack (1 when L = 1), 0 outside; x = t (len - 1); linear
interpolation between values[int(x)] and the next; filters are substrings, first match wins."""

import math

import pytest

from mergecli.models.architecture import Architecture
from mergecli.methods.schedule import chain, check, depth_position, evaluate, resolve, resolve_first

Q = "model.layers.{}.self_attn.q_proj.weight"
UP = "model.layers.{}.mlp.up_proj.weight"
NORM = "model.layers.{}.input_layernorm.weight"


def arch(layers: int) -> Architecture:
    return Architecture("llama", {}, frozenset(), frozenset(), layers)


def at(setting, name: str, layers: int, **kwargs):
    """The setting's value for a tensor, its layer as the architecture says."""
    return resolve(setting, name, arch(layers).layer_of(name), layers, **kwargs)


def first(settings, name: str, layers: int, **kwargs):
    return resolve_first(settings, name, arch(layers).layer_of(name), layers, **kwargs)


def test_layer_of_common_layouts():
    layer_of = arch(12).layer_of
    assert layer_of("model.layers.3.mlp.up_proj.weight") == 3
    assert layer_of("transformer.h.11.attn.c_attn.weight") == 11
    assert layer_of("gpt_neox.layers.0.attention.dense.weight") == 0
    assert layer_of("model.embed_tokens.weight") is None
    assert layer_of("lm_head.weight") is None
    assert layer_of("model.norm.weight") is None


def test_depth_position():
    assert depth_position(None, 32) == 0.0
    assert depth_position(0, 4) == 0.0
    assert depth_position(3, 4) == 1.0
    assert depth_position(1, 4) == pytest.approx(1 / 3)
    assert depth_position(0, 1) == 1.0  # mergekit: a one-layer slice gets t = 1
    with pytest.raises(ValueError):
        depth_position(4, 4)


def test_scalar_applies_everywhere():
    for name in (Q.format(0), "model.embed_tokens.weight", "lm_head.weight"):
        assert at(0.3, name, 4) == 0.3


def test_gradient_three_values_four_layers():
    # mergekit's examples/ties.yml density gradient [1, 0.7, 0.1] on 4 layers:
    # t = 0, 1/3, 2/3, 1 -> x = 0, 2/3, 4/3, 2
    gradient = [1, 0.7, 0.1]
    expected = [1.0, 1 + (2 / 3) * (0.7 - 1), 0.7 + (1 / 3) * (0.1 - 0.7), 0.1]  # 1, 0.8, 0.5, 0.1
    got = [at(gradient, Q.format(i), 4) for i in range(4)]
    assert got == pytest.approx(expected)
    assert got == pytest.approx([1.0, 0.8, 0.5, 0.1])


def test_gradient_outside_layers_takes_first_value():
    gradient = [0.2, 0.9]
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert at(gradient, name, 8) == 0.2


def test_gradient_forty_layers():
    # examples/gradient-slerp.yml, self_attn: [0, 0.5, 0.3, 0.7, 1] over 40 layers; layer 10:
    # t = 10/39, x = 40/39 -> between 0.5 and 0.3 at fraction 1/39
    gradient = [0, 0.5, 0.3, 0.7, 1]
    assert at(gradient, Q.format(10), 40) == pytest.approx(0.5 + (1 / 39) * (0.3 - 0.5))
    assert at(gradient, Q.format(0), 40) == 0
    assert at(gradient, Q.format(39), 40) == 1


def test_single_layer_model_uses_last_value():
    assert at([0.0, 1.0], Q.format(0), 1) == 1.0
    assert at([0.0, 1.0], "model.embed_tokens.weight", 1) == 0.0


def test_filter_list_of_gradient_slerp_example():
    t = [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
         {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
         {"value": 0.5}]
    assert at(t, Q.format(0), 5) == 0
    assert at(t, Q.format(4), 5) == 1
    assert at(t, Q.format(2), 5) == pytest.approx(0.3)  # t = 0.5 -> x = 2 exactly
    assert at(t, UP.format(0), 5) == 1
    assert at(t, UP.format(1), 5) == pytest.approx(0.5)
    assert at(t, NORM.format(1), 5) == 0.5
    assert at(t, "model.embed_tokens.weight", 5) == 0.5


def test_filters_are_substrings_not_regexes():
    by_filter = [{"filter": "layers.1.", "value": 1.0}, {"value": 0.0}]
    assert at(by_filter, "model.layers.1.mlp.up_proj.weight", 12) == 1.0
    assert at(by_filter, "model.layers.10.mlp.up_proj.weight", 12) == 0.0
    by_regex = [{"regex": "layers.1.", "value": 1.0}, {"value": 0.0}]
    assert at(by_regex, "model.layers.10.mlp.up_proj.weight", 12) == 1.0  # '.' matches any character
    anchored = [{"regex": r"layers\.(0|1)\.", "value": 1.0}, {"value": 0.0}]
    assert [at(anchored, UP.format(i), 12) for i in (0, 1, 2, 10)] == [1.0, 1.0, 0.0, 0.0]


def test_star_filter_and_first_match_wins():
    setting = [{"filter": "q_proj", "value": 1.0}, {"filter": "*", "value": 2.0}, {"filter": "q_proj", "value": 3.0}]
    assert at(setting, Q.format(0), 2) == 1.0
    assert at(setting, UP.format(0), 2) == 2.0


def test_no_match_falls_through_to_next_level():
    per_model = [{"filter": "mlp", "value": 0.5}]
    assert at(per_model, Q.format(0), 2) is None
    assert first([per_model, 1.0], Q.format(0), 2) == 1.0
    assert first([per_model, 1.0], UP.format(0), 2) == 0.5
    assert first([None, per_model], Q.format(0), 2, default=0.25) == 0.25


def test_chain_equals_precedence():
    model = [{"filter": "mlp", "value": [0.0, 1.0]}]
    global_ = [{"filter": "self_attn", "value": 0.3}, {"value": 0.7}]
    flat = chain(model, global_)
    assert flat == [{"filter": "mlp", "value": [0.0, 1.0]}, {"filter": "self_attn", "value": 0.3}, {"value": 0.7}]
    names = [Q.format(i) for i in range(3)] + [UP.format(i) for i in range(3)] + ["model.embed_tokens.weight"]
    for name in names:
        assert at(flat, name, 3) == first([model, global_], name, 3)
    assert chain(0.5, 0.7) == 0.5
    assert chain(None, [0.1, 0.2]) == [0.1, 0.2]
    assert chain([{"filter": "mlp", "value": 1}], [0.1, 0.2]) == [{"filter": "mlp", "value": 1}, {"value": [0.1, 0.2]}]
    assert chain([{"value": 1}], 2) == [{"value": 1}]  # nothing after an unconditional entry
    assert chain(None, None) is None
    assert chain([], 0.5) == 0.5  # mergekit: an empty list resolves to nothing


def test_non_numeric_gradient_picks_without_interpolating():
    # mergekit: values[int(t * (len - 1))]
    assert [at([True, False], Q.format(i), 3, coerce=bool) for i in range(3)] == [True, True, False]


def test_numeric_strings_are_coerced_before_interpolating():
    assert evaluate(["1e-3", "3e-3"], Q.format(0), 0.5) == pytest.approx(2e-3)


@pytest.mark.parametrize("bad, message", [
    ([], "expected a number"),
    ([{"filter": "mlp"}], "missing 'value'"),
    ([{"filter": "mlp", "value": 1, "weight": 2}], "unknown key 'weight'"),
    ([{"filter": 3, "value": 1}], "must be a string"),
    ([{"regex": "(", "value": 1}], "not a regular expression"),
    ([{"filter": "a", "regex": "b", "value": 1}], "not both"),
    ([0.5, {"value": 1}], "mixes"),
    ({"value": {"a": 1}}, "expected a number or a list of numbers"),
    (None, "expected a number"),
])
def test_check_refuses_malformed_settings(bad, message):
    with pytest.raises(ValueError, match=message):
        check(bad, "weight")


def test_check_accepts_the_three_forms():
    check(0.5)
    check([0, 0.5, 1])
    check([{"filter": "mlp", "value": [0, 1]}, {"regex": r"\.q_proj\.", "value": 1}, {"value": 0.5}])
    check({"filter": "mlp", "value": 1})
    assert math.isclose(at({"filter": "mlp", "value": 1}, UP.format(0), 2), 1)
