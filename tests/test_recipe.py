"""Recipes: validation errors name the field, overrides work, built-ins list and copy."""

import json

import pytest
import yaml

from helpers import cli
from mergecli import load_recipe
from mergecli.app.cli import builtin_recipes



def write(tmp_path, data, name="r.yaml"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


@pytest.fixture
def good(tmp_path):
    for name in ("base", "ft1", "ft2"):
        (tmp_path / name).mkdir()
    return {"base": "./base", "models": [{"model": "./ft1"}, {"model": "./ft2", "weight": 0.5}],
            "merges": [{"name": "t", "method": "ties"}, {"name": "d", "method": "dare_ties", "density": 0.3}]}


def test_valid_recipe_resolves_defaults_and_paths_relative_to_the_file(tmp_path, good, monkeypatch):
    monkeypatch.chdir("/")
    recipe = load_recipe(write(tmp_path, good))
    assert [m.name for m in recipe.models] == ["ft1", "ft2"]
    ties = recipe.merge("t")
    assert (ties.params["score"], ties.params["density"], ties.params["lambda"]) == ("magnitude", 0.2, 1.0)
    assert recipe.merge("d").params["score"] == "random"
    assert recipe.resolve("./ft1") == str(tmp_path / "ft1")
    assert recipe.workspace_path == tmp_path / "workspace"


def test_overrides_by_index_by_name_and_for_every_variant(tmp_path, good):
    path = write(tmp_path, good)
    assert load_recipe(path, ["merges.0.density=0.5"]).merge("t").params["density"] == 0.5
    assert load_recipe(path, ["merges.d.seed=9"]).merge("d").params["seed"] == 9
    every = load_recipe(path, ["density=0.4"])
    assert [m.params["density"] for m in every.merges] == [0.4, 0.4]
    assert load_recipe(path, ["models.ft2.weight=2"]).models[1].weight == 2.0


BAD = [
    ("merges.0.method", {"merges": [{"name": "t", "method": "tie"}]}, "unknown method 'tie' (did you mean 'ties'?)"),
    ("merges.0.density", {"merges": [{"name": "t", "method": "ties", "density": 1.5}]}, "must be in (0, 1], got 1.5"),
    ("merges.0.density", {"merges": [{"name": "t", "method": "ties", "density": 0}]}, "must be in (0, 1], got 0"),
    ("merges.1.name", {"merges": [{"name": "t", "method": "ties"}, {"name": "t", "method": "ties"}]},
     "duplicate merge name 't'"),
    ("merges.0.densty", {"merges": [{"name": "t", "method": "ties", "densty": 0.2}]},
     "unknown field (did you mean 'density'?)"),
    ("models", {"models": []}, "at least 1 item"),
    ("base", {"base": None}, "valid string"),
    ("merges.0.score", {"merges": [{"name": "t", "method": "ties", "score": "magnitud"}]}, "did you mean 'magnitude'"),
    ("merges.0.density", {"merges": [{"name": "t", "method": "task_arithmetic", "density": 0.2}]},
     "unknown field (task_arithmetic takes: lambda, normalize)"),
    ("models.0.model", {"models": [{"model": "./nope"}]}, "path does not exist"),
    ("models.0.model", {"models": [{"model": "./base"}]}, "is the base model itself"),
    ("merges.0.models", {"merges": [{"name": "t", "method": "ties", "models": ["zz"]}]}, "'zz' is not a model"),
    ("merges.0.dtype", {"merges": [{"name": "t", "method": "ties", "dtype": "int8"}]}, "float32"),
    ("shard_size", {"shard_size": "lots"}, "not a size"),
    ("merges.0.lambda", {"merges": [{"name": "t", "method": "ties", "lambda": "big"}]}, "must be a number"),
]


@pytest.mark.parametrize("field,change,message", BAD, ids=[b[0] + ":" + b[2][:20] for b in BAD])
def test_invalid_recipe_is_one_clear_line_with_exit_code_2(tmp_path, good, field, change, message):
    path = write(tmp_path, {**good, **change})
    result = cli("validate", str(path), code=None)
    assert result.exit_code == 2, result.output
    assert field in result.stderr and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") <= 2


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = write(tmp_path, "base: ./b\nmodels: [\n  - oops: {\n")
    result = cli("validate", str(path), code=None)
    assert result.exit_code == 2 and "YAML syntax error at line" in result.stderr


def test_missing_recipe_file_and_bad_override(tmp_path, good):
    assert "recipe not found" in cli("validate", str(tmp_path / "x.yaml"), code=None).stderr
    result = cli("validate", str(write(tmp_path, good)), "merges.7.density=0.1", code=None)
    assert result.exit_code == 2 and "index 7 out of range" in result.stderr


def test_validate_json_output(tmp_path, good):
    result = cli("--json", "validate", str(write(tmp_path, good)), code=None)
    data = json.loads(result.stdout)
    assert data["valid"] and data["recipe"]["merges"][0]["lambda"] == 1.0


def test_builtin_recipes_list_copy_and_validate_schema(tmp_path):
    listed = json.loads(cli("--json", "recipes", "ls", code=None).stdout)
    assert {"basic-ties", "all-methods"} <= set(listed)
    for name in listed:
        result = cli("recipes", "cp", name, str(tmp_path), code=None)
        assert result.exit_code == 0, result.stderr
        recipe = load_recipe(tmp_path / f"{name}.yaml", check_paths=False)
        assert recipe.merges
    again = cli("recipes", "cp", "basic-ties", str(tmp_path), code=None)
    assert again.exit_code == 1 and "already exists" in again.stderr
    assert set(builtin_recipes()) == set(listed)


def test_eval_without_any_dataset_says_what_to_add(tmp_path, good):
    result = cli("eval", str(write(tmp_path, good)), code=None)
    assert result.exit_code == 1 and "nothing to evaluate on" in result.stderr


def test_version_and_bare_invocation():
    assert cli("--version", code=None).stdout.startswith("mergecli ")
    bare = cli(code=None)  # help, with Click's exit code for "no arguments"
    assert bare.exit_code == 2 and "Usage" in bare.stdout and "compare" in bare.stdout


def test_help_archs_and_validate_never_load_torch():
    """`--help`, `archs` and reading the command list answer at once: no torch, no transformers."""
    import subprocess
    import sys

    script = ("import sys\nfrom typer.testing import CliRunner\nfrom mergecli.app.cli import app\n"
              "for args in (['--help'], ['merge', '--help'], ['archs'], ['recipes', 'ls']):\n"
              "    assert CliRunner().invoke(app, args).exit_code == 0, args\n"
              "print(sorted(m for m in ('torch', 'transformers', 'peft', 'datasets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
