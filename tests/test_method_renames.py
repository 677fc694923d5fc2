"""Method names with mergekit's meaning: `linear` is the weighted average of the models (formerly
`soup`), top-k-trimmed task arithmetic is `task_arithmetic_topk` (formerly `linear`). The old
spellings answer with what to write instead, and a recipe written for the old `linear` cannot
silently become the other model."""

from pathlib import Path

import pytest

from helpers import cli, error_line, write_recipe
from mergecli.errors import RecipeError
from mergecli.methods import catalog
from mergecli.recipe.load import validate_recipe

SOUP = "merges.0.method: 'soup' is now called 'linear' (mergekit's weighted average); write method: linear"
FORMER_LINEAR = ("linear is now mergekit's weighted average of the models (formerly soup): for the top-k-trimmed "
                 "task arithmetic write method: task_arithmetic_topk")


def validate(merge: dict) -> None:
    validate_recipe({"base": "b", "models": [{"name": "a", "model": "a"}, {"name": "c", "model": "c"}],
                     "merges": [{"name": "m", **merge}]}, Path("."), check_paths=False)


def test_the_methods_under_their_new_names():
    methods = catalog()
    assert "soup" not in methods
    assert {p.name for p in methods["linear"].params} == {"normalize", "base_weight"}
    assert methods["linear"].needs_base and not methods["linear"].additive
    topk = methods["task_arithmetic_topk"]
    assert topk.trim == "topk" and topk.additive and topk.defaults()["density"] == 0.2
    validate({"method": "linear", "base_weight": 0.5})
    validate({"method": "task_arithmetic_topk", "density": 0.3, "score": "magnitude"})


@pytest.mark.parametrize("merge, message", [
    ({"method": "soup"}, SOUP),
    ({"method": "soup", "base_weight": 0.5}, SOUP),
    ({"method": "linear", "density": 0.3}, "merges.0.density: unknown field (linear takes: normalize, base_weight); "
                                           + FORMER_LINEAR),
    ({"method": "linear", "score": "sparsegpt", "compensate": True}, FORMER_LINEAR),
    ({"method": "linear", "models": [{"name": "a", "density": 0.3}]},
     "merges.0.models.0.density: not a per-model parameter of linear (per model: weight); " + FORMER_LINEAR),
])
def test_old_names_and_meanings_say_what_to_write(merge, message):
    with pytest.raises(RecipeError) as info:
        validate(merge)
    assert message in str(info.value)


def test_an_unrelated_unknown_field_of_linear_gets_no_hint():
    with pytest.raises(RecipeError) as info:
        validate({"method": "linear", "t": 0.5})
    assert "unknown field" in str(info.value) and "task_arithmetic_topk" not in str(info.value)


def test_the_cli_answers_soup_with_one_line(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "a").mkdir()
    recipe = write_recipe(tmp_path / "r.yaml", "./base", [{"name": "a", "model": "./a"}],
                          [{"name": "avg", "method": "soup"}])
    assert error_line(cli("validate", recipe, code=2)).endswith(SOUP)
