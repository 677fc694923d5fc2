"""Multi-stage files (`---`-separated documents, later ones naming earlier merges): run as one plan
by `mergecli merge FILE`, each stage cached and keyed like any merge, a stage rebuilt exactly when
its recipe or an input merge's key changed; mergekit-multi's rules for names; errors.

mergekit-multi's own outputs are compared in test_mergekit_slow.py (`run_multi`).
"""

import json
from pathlib import Path
from string import Template

import pytest
import yaml

from helpers import cli, digests, error_line
from mergekit_oracle import CONFIGS, build_models, load_folder, reference_merge
from mergecli.recipe.load import load_recipe


@pytest.fixture(scope="module")
def mk_models(tmp_path_factory) -> dict[str, Path]:
    return build_models(tmp_path_factory.mktemp("multi-models"))


def render(mk_models, folder: Path, name: str = "multimerge") -> Path:
    text = Template((CONFIGS / "multi" / f"{name}.yml").read_text()).substitute({k: str(v) for k, v in
                                                                                mk_models.items()})
    path = folder / f"{name}.yml"
    path.write_text(text)
    return path


def merged(path: Path, *args: str) -> dict[str, dict]:
    return {r["name"]: r for r in json.loads(cli("--json", "merge", path, *args).stdout)}


def test_stages_run_in_order_and_each_matches_its_recipe(mk_models, tmp_path):
    path = render(mk_models, tmp_path)
    first = merged(path)
    assert list(first) == ["first-merge", "second-merge", "multimerge"]  # the unnamed one: after the file
    assert {Path(r["path"]) for r in first.values()} == {tmp_path / "merged" / n for n in first}
    final = load_recipe(path, check_paths=False)
    assert [s.merges[0].name for s in final.stages] == ["first-merge", "second-merge"]
    second = final.stages[1]
    assert second.base == str(tmp_path / "merged" / "first-merge") and second.produced == {second.base: "first-merge"}
    for stage in [*final.stages, final]:  # each stage's merge from its inputs as written
        data = stage.model_dump(mode="json", by_alias=True, exclude_none=True)
        ours = load_folder(tmp_path / "merged" / stage.merges[0].name)
        for name, value in reference_merge(data, tmp_path).items():
            assert (ours[name] - value).abs().max() < 2e-6, (stage.merges[0].name, name)


def test_a_rerun_rebuilds_only_what_changed(mk_models, tmp_path):
    path = render(mk_models, tmp_path)
    first = merged(path)
    again = merged(path)
    assert all(r["reused"] for r in again.values())
    final_only = merged(path, "merges.multimerge.lambda=0.5")  # the final stage's own recipe
    assert [r["reused"] for r in final_only.values()] == [True, True, False]
    middle = merged(path, "merges.second-merge.t=0.25")  # an input merge's key changed: the final too
    assert [r["reused"] for r in middle.values()] == [True, False, False]
    assert middle["multimerge"]["key"] not in (first["multimerge"]["key"], final_only["multimerge"]["key"])
    back = merged(path)
    assert [r["reused"] for r in back.values()] == [True, False, False]
    assert back["second-merge"]["key"] == first["second-merge"]["key"]
    assert back["multimerge"]["key"] == first["multimerge"]["key"]  # the key is the recipe's, not the files'


def test_only_builds_a_stage_and_what_it_merges(mk_models, tmp_path):
    path = render(mk_models, tmp_path)
    built = merged(path, "--only", "second-merge")
    assert list(built) == ["first-merge", "second-merge"] and not (tmp_path / "merged" / "multimerge").exists()
    assert "no merge named 'third'" in error_line(cli("merge", path, "--only", "third", code=2))


def test_overrides_reach_the_stages_they_name(mk_models, tmp_path):
    path = render(mk_models, tmp_path)
    final = load_recipe(path, [f"output_dir={tmp_path / 'elsewhere'}", "merges.first-merge.base_weight=0.3",
                               "lambda=0.7"], check_paths=False)
    first, second = final.stages
    assert all(r.output_dir == str(tmp_path / "elsewhere") for r in (first, second, final))
    assert second.base == str(tmp_path / "elsewhere" / "first-merge")  # references follow output_dir
    assert first.merges[0].params["base_weight"] == 0.3 and final.merges[0].params["lambda"] == 0.7


def documents(*docs: dict) -> str:
    return "---\n".join(yaml.safe_dump(d) for d in docs)


@pytest.mark.parametrize("docs, message", [
    ([{"merge_method": "linear", "models": [{"model": "${ft_a}", "parameters": {"weight": 1}}]},
      {"merge_method": "linear", "models": [{"model": "${ft_b}", "parameters": {"weight": 1}}]}],
     "document 2: a second merge without a name"),
    ([{"name": "a", "merge_method": "slerp", "base_model": "b", "models": [{"model": "${ft_a}"}],
       "parameters": {"t": 0.5}},
      {"name": "b", "merge_method": "slerp", "base_model": "a", "models": [{"model": "${ft_a}"}],
       "parameters": {"t": 0.5}}],
     "circular dependency between stages: a -> b -> a"),
    ([{"name": "a", "merge_method": "slerp", "base_model": "${base}", "models": [{"model": "${ft_a}"}],
       "parameters": {"t": 0.5}},
      {"name": "a", "merge_method": "slerp", "base_model": "${base}", "models": [{"model": "${ft_b}"}],
       "parameters": {"t": 0.5}}],
     "document 2: merge name 'a' is document 1's too"),
])
def test_a_bad_multi_stage_file_is_one_line_and_nothing_written(mk_models, tmp_path, docs, message):
    path = tmp_path / "multi.yml"
    path.write_text(Template(documents(*docs)).substitute({k: str(v) for k, v in mk_models.items()}))
    before = digests(tmp_path)
    for command in ("validate", "merge"):
        assert message in error_line(cli(command, path, code=2))
    assert digests(tmp_path) == before


def test_recipes_import_takes_one_document(mk_models, tmp_path):
    path = render(mk_models, tmp_path)
    result = cli("recipes", "import", path, code=2)
    assert "a multi-stage file (3 documents); run it as it is" in error_line(result)


def test_recipes_name_earlier_merges_too(mk_models, tmp_path):
    path = tmp_path / "stages.yaml"
    path.write_text(documents(
        {"base": str(mk_models["base"]), "models": [{"name": "a", "model": str(mk_models["ft_a"])},
                                                    {"name": "b", "model": str(mk_models["ft_b"])}],
         "merges": [{"name": "blend", "method": "task_arithmetic", "lambda": 0.5}]},
        {"base": "blend", "models": [{"name": "far", "model": str(mk_models["ft_far"])}],
         "merges": [{"name": "arc", "method": "slerp", "t": 0.3}]}))
    built = merged(path, f"workspace={tmp_path / 'ws'}")
    assert list(built) == ["blend", "arc"] and Path(built["arc"]["path"]) == tmp_path / "merged" / "arc"
    from mergecli.methods.interpolate import slerp

    name = "model.layers.1.mlp.up_proj.weight"
    blend, far, arc = (load_folder(p)[name] for p in (tmp_path / "merged" / "blend", mk_models["ft_far"],
                                                       tmp_path / "merged" / "arc"))
    assert (arc - slerp(blend, far, 0.3)).abs().max() < 2e-6


def test_every_stage_is_keyed_before_anything_is_built(mk_models, tmp_path):
    from mergecli.stages import merge
    from mergecli.stages.base import Context

    path = render(mk_models, tmp_path)
    planned = [s.key() for s in merge.plan(Context(load_recipe(path, check_paths=False))) if s.kind == "merge"]
    assert len(planned) == 3 and not (tmp_path / "merged").exists()  # an earlier merge is known by its key
    assert [r["key"] for r in merged(path).values()] == planned
    listed = json.loads(cli("--json", "ws", "ls", path).stdout)
    assert {e["label"] for e in listed} == {"taskvec ft_b", "taskvec ft_far", "taskvec second-merge",
                                            "taskvec ft_c"}
    assert all(e["used"] for e in listed)  # every stage's task vectors belong to the file, not the final's only
