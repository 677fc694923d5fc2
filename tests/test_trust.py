"""Trust: mergecli never deletes, overwrites or runs what it did not make, never reuses a result whose
inputs changed, never writes NaN/Inf or out-of-range values, and turns every user-caused failure
into one clear line. Each case checks the exit code, the message, and that every input file is
byte-identical afterwards."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from helpers import CODE, VERSE, cli, digests, error_line, write_jsonl


class Lab:
    """A folder with copies of the tiny models, a dataset and a recipe to break one thing at a time."""

    def __init__(self, root: Path, models: Path) -> None:
        self.root = root
        for name in ("base", "ft_a", "ft_b", "lora_c"):
            shutil.copytree(models / name, root / name)
        write_jsonl(root / "code.jsonl", CODE)
        write_jsonl(root / "verse.jsonl", VERSE)
        self.data = {"name": "trust", "base": "./base",
                     "models": [{"name": "a", "model": "./ft_a", "dataset": {"path": "./code.jsonl"}},
                                {"name": "b", "model": "./ft_b", "dataset": {"path": "./verse.jsonl"}}],
                     "merges": [{"name": "ties", "method": "ties"}],
                     "calibration": {"samples": 2, "seq_len": 16}, "evaluation": {"samples": 2, "seq_len": 16},
                     "workspace": "ws", "output_dir": "out"}

    def recipe(self, name: str = "r.yaml", **changes) -> Path:
        data = json.loads(json.dumps(self.data))
        for dotted, value in changes.items():
            node = data
            *parents, last = dotted.split("__")
            for key in parents:
                node = node[int(key)] if key.isdigit() else node[key]
            node[int(last) if last.isdigit() else last] = value
        path = self.root / name
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    def inputs(self) -> dict[str, str]:
        return digests(*(self.root / n for n in ("base", "ft_a", "ft_b", "lora_c", "code.jsonl", "verse.jsonl")))


@pytest.fixture
def lab(tmp_path, models) -> Lab:
    return Lab(tmp_path, models)


def refused(lab: Lab, *args, code: int = 1, message: str) -> None:
    """The command fails with one line containing `message` and every input is unchanged."""
    before = lab.inputs()
    result = cli(*args, code=code)
    assert message in error_line(result), result.stderr
    assert lab.inputs() == before


# -- ownership: nothing of the user's is deleted, replaced or run -----------------------------------
def test_workspace_holding_the_models_is_refused_and_gc_deletes_nothing_of_theirs(lab):
    recipe = lab.recipe(workspace=".")
    refused(lab, "merge", recipe, message="workspace")
    refused(lab, "ws", "gc", recipe, message="contains the base model")
    assert (lab.root / "base" / "model.safetensors").is_file()


def test_gc_never_touches_folders_it_did_not_make_even_inside_the_workspace(lab):
    recipe = lab.recipe(output_dir="ws/out")
    cli("merge", recipe)
    (lab.root / "ws" / "notes").mkdir()
    (lab.root / "ws" / "taskvec" / "0123456789abcdef0123").mkdir()  # looks like an artifact, has no marker
    cli("ws", "gc", lab.recipe(merges=[]))  # keeps nothing of the old recipe's
    assert (lab.root / "ws" / "out" / "ties" / "model.safetensors").is_file()
    assert (lab.root / "ws" / "notes").is_dir() and (lab.root / "ws" / "taskvec" / "0123456789abcdef0123").is_dir()


@pytest.mark.parametrize("output_dir,merge", [(".", "base"), (".", "ft_a"), ("base", "sub"), ("ft_a/..", "ft_b")])
def test_an_output_that_is_or_is_inside_an_input_is_refused_even_with_overwrite(lab, output_dir, merge):
    recipe = lab.recipe(output_dir=output_dir, merges=[{"name": merge, "method": "ties"}])
    refused(lab, "merge", recipe, "--overwrite", message="mergecli never writes into its inputs")


@pytest.mark.parametrize("field", ["output_dir", "workspace"])
def test_nothing_is_written_into_the_general_text_a_learned_merge_is_held_to(lab, field):
    """`calibration.general` is an input like a fine-tune's dataset: a workspace or output inside its
    folder is refused before anything is computed, and its files stay byte-identical."""
    general = lab.root / "general"
    general.mkdir()
    write_jsonl(general / "train.jsonl", VERSE)
    before = digests(general)
    recipe = lab.recipe(**{field: "general/inside"},
                        calibration={"samples": 2, "seq_len": 16, "general": {"path": "./general"}},
                        merges=[{"name": "l", "method": "task_arithmetic", "lambda": "learned"}])
    refused(lab, "merge", recipe, message="dataset 'calibration.general'")
    assert digests(general) == before and not (general / "inside").exists()


def test_chaining_merges_never_overwrites_the_base(lab):
    cli("merge", lab.recipe(merges=[{"name": "step", "method": "ties"}]))
    chained = lab.recipe("chain.yaml", base="./out/step", models=[{"name": "a", "model": "./ft_a"}],
                         merges=[{"name": "step", "method": "task_arithmetic"}])
    before = digests(lab.root / "out" / "step")
    assert "is the base model" in error_line(cli("merge", chained, code=1))
    assert digests(lab.root / "out" / "step") == before


def test_a_manifest_entry_pointing_outside_is_ignored_never_followed(lab, tmp_path):
    recipe = lab.recipe()
    cli("taskvec", recipe)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("mine")
    manifest = json.loads((lab.root / "ws" / "manifest.json").read_text())
    manifest["entries"]["0123456789abcdef0123"] = {"kind": "../victim", "files": {"x": {"size": 1}}}
    manifest["entries"]["../../victim"] = {"kind": "taskvec", "files": {}}
    (lab.root / "ws" / "manifest.json").write_text(json.dumps(manifest))
    for args in (["taskvec", recipe], ["ws", "gc", recipe], ["ws", "ls", recipe]):
        cli(*args)
    assert (victim / "precious.txt").read_text() == "mine"


def test_an_artifact_replaced_by_a_symlink_is_a_clear_error_and_its_target_survives(lab, tmp_path):
    recipe = lab.recipe()
    cli("taskvec", recipe)
    folder = next((lab.root / "ws" / "taskvec").iterdir())
    elsewhere = tmp_path / "elsewhere"
    shutil.move(folder, elsewhere)
    folder.symlink_to(elsewhere)
    before = digests(elsewhere)
    assert "symbolic link" in error_line(cli("taskvec", recipe, code=1))
    cli("ws", "gc", lab.recipe(merges=[], models=[{"name": "b", "model": "./ft_b"}]))
    assert digests(elsewhere) == before and folder.is_symlink()


def test_a_model_that_needs_its_own_code_is_refused_and_the_code_never_runs(lab):
    config = json.loads((lab.root / "ft_a" / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (lab.root / "ft_a" / "config.json").write_text(json.dumps(config))
    (lab.root / "ft_a" / "modeling_evil.py").write_text(f"open({str(lab.root / 'ran')!r}, 'w').write('x')\n")
    recipe = lab.recipe()
    for command in ("merge", "hessian", "eval"):
        result = cli(command, recipe, code=1, input="y\ny\n")  # a prompt, if any, would be answered yes
        assert "needs custom code" in error_line(result)
    assert not (lab.root / "ran").exists()


def test_a_workspace_inside_the_base_model_is_refused(lab):
    refused(lab, "taskvec", lab.recipe(workspace="base/ws"), message="is inside the base model")
    assert not (lab.root / "base" / "ws").exists()


# -- nothing stale is reused --------------------------------------------------------------------
def test_edited_calibration_and_evaluation_data_are_recomputed(lab):
    recipe = lab.recipe(merges=[{"name": "sg", "method": "ties", "score": "sparsegpt"}])
    cli("compare", recipe)
    write_jsonl(lab.root / "code.jsonl", [t.replace("def", "async def") for t in CODE])
    os.utime(lab.root / "code.jsonl", ns=(0, 0))  # even with the old modification time: the content counts
    again = cli("compare", recipe)
    assert "hessians a: collected" in again.stderr and "hessians b: reused" in again.stderr
    assert "merge sg: wrote" in again.stderr


def test_a_merged_folder_cut_in_half_is_rebuilt_not_reused(lab):
    recipe = lab.recipe()
    cli("merge", recipe)
    shard = lab.root / "out" / "ties" / "model.safetensors"
    good = shard.read_bytes()
    shard.write_bytes(good[: len(good) // 2])
    again = cli("merge", recipe)
    assert "is damaged" in again.stderr and shard.read_bytes() == good


def test_every_recipe_field_that_changes_a_result_changes_some_key(lab):
    """Keys are derived from the validated recipe, not listed by hand: change each field of a full
    recipe in turn; the artifacts it plans must change unless the field is declared `runtime`."""
    from mergecli import load_recipe
    from mergecli.app.cli import used_by

    full = lab.recipe(extra_tokens="error", shard_size="2GB", models=[
        {"name": "a", "model": "./ft_a", "weight": 1.0, "check_base": True,
         "dataset": {"path": "./code.jsonl", "text_field": "text", "split": "train", "holdout": 0.1}},
        {"name": "b", "model": "./ft_b", "dataset": {"path": "./verse.jsonl"}}],
        merges=[{"name": "m", "method": "ties", "score": "sparsegpt", "density": 0.3, "lambda": 1.0, "topk": "tensor",
                 "damp": 0.01, "compensate": False, "dtype": "float32", "overflow": "error", "models": ["a", "b"]},
                {"name": "l", "method": "task_arithmetic", "lambda": "learned"}],
        calibration={"samples": 2, "seq_len": 16, "general": {"path": "./verse.jsonl"}})
    changes = {"extra_tokens": "base", "shard_size": "1GB", "models__0__weight": 0.5, "models__0__check_base": False,
               "models__0__dataset__holdout": 0.2, "models__0__dataset__split": "all",
               "merges__0__density": 0.4, "merges__0__lambda": 0.9, "merges__0__topk": "row", "merges__0__damp": 0.1,
               "merges__0__compensate": True, "merges__0__dtype": "bfloat16", "merges__0__overflow": "clamp",
               "merges__0__models": ["b", "a"], "calibration__samples": 3, "calibration__seq_len": 17,
               "calibration__seed": 1, "calibration__pack": False, "calibration__source": "base",
               "calibration__general": {"path": "./code.jsonl"},
               "evaluation__samples": 3, "evaluation__seq_len": 17, "evaluation__seed": 2, "name": "other"}
    runtime = {"calibration__batch_size": 9, "calibration__layer_by_layer": True, "evaluation__batch_size": 9}
    data = yaml.safe_load(full.read_text())
    keys = used_by(load_recipe(full))

    def planned(**change) -> set[str]:
        edited = json.loads(json.dumps(data))
        for dotted, value in change.items():
            node = edited
            *parents, last = dotted.split("__")
            for key in parents:
                node = node[int(key)] if key.isdigit() else node[key]
            node[last] = value
        path = lab.root / "edited.yaml"
        path.write_text(yaml.safe_dump(edited))
        return used_by(load_recipe(path))

    for field, value in changes.items():
        assert planned(**{field: value}) != keys, f"{field} reaches no key"
    for field, value in runtime.items():
        assert planned(**{field: value}) == keys, f"runtime field {field} changed a key"


# -- numbers: nothing absurd is accepted, nothing unrepresentable is written -------------------------
@pytest.mark.parametrize("change,field", [
    ({"merges": [{"name": "t", "method": "ties", "lambda": float("nan")}]}, "merges.0.lambda"),
    ({"merges": [{"name": "t", "method": "ties", "lambda": 1e30}]}, "merges.0.lambda"),
    ({"models__0__weight": float("inf")}, "models.0.weight"),
    ({"merges": [{"name": "t", "method": "ties", "density": float("nan")}]}, "merges.0.density"),
    ({"calibration__samples": 10**12}, "calibration.samples"),
    ({"merges": [{"name": "t", "method": "ties", "models": []}]}, "merges.0.models"),
    ({"merges": [{"name": "", "method": "ties"}]}, "merges.0.name"),
    ({"merges": [{"name": "a/b", "method": "ties"}]}, "merges.0.name"),
    ({"merges": [{"name": "..", "method": "ties"}]}, "merges.0.name"),
    ({"merges": [{"name": "x" * 300, "method": "ties"}]}, "merges.0.name"),
    ({"models__0__name": ""}, "models.0.name"),
    ({"models__0__weight": -1.0, "models__1__weight": 0.5}, "merges.0.weight"),
])
def test_absurd_values_are_recipe_errors_and_json_stays_json(lab, change, field):
    recipe = lab.recipe(**change)
    result = cli("--json", "validate", recipe, code=2)
    assert field in error_line(result) and result.stdout == ""


def test_duplicate_yaml_keys_are_refused(lab):
    path = lab.root / "dup.yaml"
    path.write_text(lab.recipe().read_text() + "base: ./ft_b\n")
    assert "key 'base' is given twice" in error_line(cli("validate", path, code=2))


def test_float16_overflow_is_an_error_naming_the_tensor_unless_clamping_is_asked_for(lab):
    weights = load_file(lab.root / "ft_a" / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] + 3e4
    save_file(weights, lab.root / "ft_a" / "model.safetensors", metadata={"format": "pt"})
    merges = [{"name": "ta", "method": "task_arithmetic", "lambda": 3.0, "dtype": "float16"}]
    refused(lab, "merge", lab.recipe(merges=merges), message="tensor model.norm.weight would hold")
    assert not (lab.root / "out" / "ta").exists()
    cli("merge", lab.recipe(merges=[{**merges[0], "overflow": "clamp"}]))
    merged = load_file(lab.root / "out" / "ta" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in merged.values())
    assert merged["model.norm.weight"].max() == torch.finfo(torch.float16).max


@pytest.mark.parametrize("value,dtype,message", [(float("nan"), None, "model.norm.weight would hold nan"),
                                                  (1e6, "float16", "model.norm.weight would hold 1e+06")])
def test_a_base_tensor_no_fine_tune_changes_is_still_checked_before_it_is_written(lab, value, dtype, message):
    weights = load_file(lab.root / "base" / "model.safetensors")
    weights["model.norm.weight"][0] = value
    save_file(weights, lab.root / "base" / "model.safetensors", metadata={"format": "pt"})
    merges = [{"name": "ta", "method": "task_arithmetic", **({"dtype": dtype} if dtype else {})}]
    models = [{"name": "c", "model": "./lora_c", "check_base": False}]  # q/v only: the norm is copied
    refused(lab, "merge", lab.recipe(models=models, merges=merges), message=message)


def test_an_integer_tensor_in_a_fine_tune_is_refused_with_its_name_and_dtype(lab):
    weights = load_file(lab.root / "ft_a" / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"].to(torch.int8)
    save_file(weights, lab.root / "ft_a" / "model.safetensors", metadata={"format": "pt"})
    refused(lab, "merge", lab.recipe(), code=2, message="model.norm.weight is int8 in the fine-tune")


def test_two_runs_with_different_workspaces_into_one_output_both_finish(lab):
    one, two = lab.recipe("one.yaml", workspace="ws1"), lab.recipe("two.yaml", workspace="ws2")
    cmd = [sys.executable, "-m", "mergecli", "-q", "merge"]
    procs = [subprocess.Popen([*cmd, str(r)], stderr=subprocess.PIPE, text=True) for r in (one, two)]
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.stderr.read()
    assert load_file(lab.root / "out" / "ties" / "model.safetensors")
    assert not [p for p in (lab.root / "out").iterdir() if p.name.startswith(".ties.") and p.suffix != ".lock"]


# -- every user-caused failure is one clear line -------------------------------------------------------
def _invalid_config(lab):
    (lab.root / "ft_a" / "config.json").write_text("{ not json")


def _invalid_index(lab):
    (lab.root / "ft_a" / "model.safetensors.index.json").write_text('{"weight_map": ')


def _overlapping_offsets(lab):
    path = lab.root / "ft_a" / "model.safetensors"
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + size])
    names = [n for n in header if n != "__metadata__"]
    first, second = header[names[0]]["data_offsets"], header[names[1]]["data_offsets"]
    header[names[1]]["data_offsets"] = [first[0], first[0] + second[1] - second[0]]  # right size, same bytes
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data[8 + size:])


def _symlink_loop(lab):
    (lab.root / "loop").symlink_to(lab.root / "loop")


def _lora_ranks(lab, rank: int):
    adapter = lab.root / "ft_a"
    shutil.rmtree(adapter)
    shutil.copytree(lab.root / "lora_c", adapter)
    weights = load_file(adapter / "adapter_model.safetensors")
    key = next(k for k in weights if k.endswith("lora_A.weight"))
    weights[key] = weights[key][:rank]
    save_file(weights, adapter / "adapter_model.safetensors")


def _file_as_workspace(lab):
    (lab.root / "ws").write_text("a file")


def _file_above_output(lab):
    (lab.root / "out").write_text("a file")


CRASHES = [
    ("invalid-config-json", _invalid_config, {}, ["merge"], "config.json"),
    ("invalid-shard-index", _invalid_index, {}, ["merge"], "model.safetensors.index.json: not valid JSON"),
    ("overlapping-offsets", _overlapping_offsets, {}, ["merge"], "overlap"),
    ("symlink-loop", _symlink_loop, {"models__0__model": "./loop"}, ["merge"], "loop"),
    ("lora-ranks-disagree", lambda lab: _lora_ranks(lab, 2), {}, ["merge"], "same rank r > 0"),
    ("lora-rank-zero", lambda lab: _lora_ranks(lab, 0), {}, ["merge"], "same rank r > 0"),
    ("workspace-is-a-file", _file_as_workspace, {}, ["taskvec"], "is a file, not a folder"),
    ("output-under-a-file", _file_above_output, {}, ["merge"], "out"),
    ("window-beyond-context", None, {"calibration__seq_len": 500}, ["hessian"], "calibration.seq_len: 500 tokens"),
    ("meta-device", None, {}, ["--device", "meta", "merge"], "device 'meta' cannot run a merge"),
]


@pytest.mark.parametrize("name,setup,change,command,message", CRASHES, ids=[c[0] for c in CRASHES])
def test_user_caused_failures_are_one_line_not_internal_errors(lab, name, setup, change, command, message):
    if setup:
        setup(lab)
    recipe = lab.recipe(**change)
    *options, stage = command
    code = 2 if name in ("symlink-loop", "meta-device") else 1  # the loop is a model that cannot be merged; meta a usage error
    result = cli(*options, stage, recipe, code=code)
    line = error_line(result)
    assert message in line and "Internal error" not in result.stderr, result.stderr


def test_a_manifest_that_is_json_but_not_an_object_is_an_empty_cache(lab):
    recipe = lab.recipe()
    cli("taskvec", recipe)
    (lab.root / "ws" / "manifest.json").write_text("[1, 2, 3]")
    assert "unreadable" in cli("taskvec", recipe).stderr


def test_compare_output_into_a_missing_folder_fails_before_any_evaluation(lab):
    result = cli("compare", lab.recipe(), "--output", lab.root / "missing" / "t.md", code=1)
    assert "does not exist" in error_line(result) and not (lab.root / "ws").exists()
    result = cli("compare", lab.recipe(), "--output", lab.root / "r.yaml", code=1)
    assert "the recipe" in error_line(result)


def test_a_recipe_path_that_is_a_folder(lab):
    assert "is a folder, not a recipe file" in error_line(cli("validate", lab.root, code=2))


def test_the_demo_never_replaces_a_folder_it_did_not_make(lab):
    from mergecli.app.demo import make_fine_tunes
    from mergecli.errors import MergeCliError
    from mergecli.progress import SILENT

    mine = lab.root / "work" / "models" / "code-full"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(MergeCliError, match="was not made by the demo"):
        make_fine_tunes(lab.root / "base", "base", lab.root / "work", SILENT)
    assert (mine / "notes.txt").read_text() == "mine"


def test_recipes_cp_into_a_missing_folder(lab):
    assert "does not exist" in error_line(cli("recipes", "cp", "basic-ties", lab.root / "nope" / "x.yaml", code=1))


@pytest.mark.parametrize("text,message", [
    ("# padding\n" * 200_000, "too large for a recipe"),
    ("base: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
])
def test_oversized_and_deeply_nested_recipes_are_refused_fast(lab, text, message):
    path = lab.root / "big.yaml"
    path.write_text(text)
    start = time.perf_counter()
    assert message in error_line(cli("validate", path, code=2))
    assert time.perf_counter() - start < 30  # no quadratic parse: seconds, not minutes, on a loaded machine


def test_unparsable_override_value(lab):
    assert "override 'density'" in error_line(cli("validate", lab.recipe(), "density=[unclosed", code=2))


def test_ctrl_c_is_one_line_exit_130_and_nothing_half_written(lab):
    merges = [{"name": f"m{i}", "method": "ties", "score": "sparsegpt", "compensate": True} for i in range(6)]
    recipe = lab.recipe(merges=merges, calibration={"samples": 8, "seq_len": 32})
    proc = subprocess.Popen([sys.executable, "-m", "mergecli", "-q", "merge", str(recipe)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (lab.root / "ws" / "hessian").exists() and time.time() < deadline:  # well into the work
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().count("\n") == 0 and "interrupted" in err
    leftovers = [p for p in (lab.root / "out").glob(".*") if p.suffix != ".lock"] if (lab.root / "out").exists() else []
    assert not leftovers
    cli("merge", recipe)


# -- ownership, whatever the layout ------------------------------------------------------------------
def layouts(root: Path) -> list[tuple[str, str, str]]:
    """(workspace, output_dir, merge name): at ., inside a model, beside it, symlinked."""
    (root / "link_to_base").symlink_to(root / "base")
    (root / "link_to_here").symlink_to(root)
    workspaces = [".", "ws", "base/ws", "ft_a", "link_to_base/ws", "link_to_here/ws", "../outside/ws", "out"]
    outputs = [".", "out", "base", "ft_a/..", "ws/out", "link_to_base", "link_to_here", "../outside/out"]
    names = ["ties", "base", "ft_b", "lora_c"]
    combos = [(w, o, n) for w in workspaces for o in outputs for n in names]
    return random.Random(0).sample(combos, 12)


def test_no_layout_of_workspace_and_output_ever_changes_an_input(lab):
    outcomes = []
    for workspace, output_dir, name in layouts(lab.root):
        recipe = lab.recipe(workspace=workspace, output_dir=output_dir, merges=[{"name": name, "method": "ties"}])
        before = lab.inputs()
        for args in (["merge", recipe], ["ws", "gc", recipe], ["merge", recipe, "--overwrite"]):
            result = cli(*args, code=None)
            assert result.exit_code in (0, 1), result.stderr
            if result.exit_code:
                error_line(result)
            outcomes.append(result.exit_code)
        assert lab.inputs() == before, (workspace, output_dir, name)
    assert 0 in outcomes and 1 in outcomes  # the sample holds both allowed and refused layouts


def test_compare_reports_never_land_on_an_input(lab):
    """`compare --output/--plot` replace only their own unchanged files: aimed at a model's file,
    into a model folder, at a dataset, through a symlink to the base or to the folder holding it,
    they are refused and every input is byte-identical; a report beside the inputs is written, and
    replaced on the rerun."""
    (lab.root / "link_to_base").symlink_to(lab.root / "base")
    (lab.root / "link_to_here").symlink_to(lab.root)
    recipe = lab.recipe()
    before = lab.inputs()
    for target in ("base/config.json", "ft_a/report.md", "code.jsonl", "link_to_base/config.json",
                   "link_to_here/ft_b/model.safetensors", "link_to_base/new.png"):
        for option in ("--output", "--plot"):
            result = cli("compare", recipe, option, lab.root / target, code=1)
            error_line(result)
            assert lab.inputs() == before, target
    for _ in range(2):
        cli("compare", recipe, "--output", lab.root / "report.json", "--plot", lab.root / "link_to_here" / "c.png")
    assert json.loads((lab.root / "report.json").read_text()) and (lab.root / "c.png").stat().st_size > 10_000
    assert lab.inputs() == before
