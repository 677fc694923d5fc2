"""The workspace cache: damaged entries are rebuilt, locks serialise runs, gc cleans up."""

import fcntl
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from helpers import CODE, cli, write_jsonl, write_recipe
from mergecli.store.artifacts import ArtifactSpec
from mergecli.store.workspace import Workspace



@pytest.fixture
def recipe(tmp_path, models):
    return write_recipe(tmp_path / "r.yaml", str(models / "base"),
                        [{"name": "a", "model": str(models / "ft_a")}, {"name": "c", "model": str(models / "lora_c")}],
                        [{"name": "ties", "method": "ties"}])


def entries(tmp_path):
    return json.loads((tmp_path / "ws" / "manifest.json").read_text())["entries"]


@pytest.mark.parametrize("damage", ["truncate", "flip_header", "delete"])
def test_damaged_cache_file_is_detected_and_rebuilt(tmp_path, recipe, damage):
    assert cli("taskvec", str(recipe), code=None).exit_code == 0
    key = next(k for k, e in entries(tmp_path).items() if e["label"] == "taskvec c")  # a LoRA: materialized
    path = tmp_path / "ws" / "taskvec" / key / "task_vector.safetensors"
    good = {k: v.clone() for k, v in load_file(path).items()}
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:-100])
    elif damage == "flip_header":
        data = bytearray(path.read_bytes())
        data[20] ^= 0x01
        path.write_bytes(bytes(data))
    else:
        path.unlink()
    result = cli("taskvec", str(recipe), code=None)
    assert result.exit_code == 0
    assert "is damaged" in result.stderr and "rebuilding" in result.stderr
    rebuilt = load_file(path)
    assert all(torch.equal(good[k], rebuilt[k]) for k in good)


def test_unreadable_manifest_means_an_empty_cache_not_a_crash(tmp_path, recipe):
    cli("taskvec", str(recipe), code=None)
    (tmp_path / "ws" / "manifest.json").write_text("{not json")
    result = cli("taskvec", str(recipe), code=None)
    assert result.exit_code == 0 and "manifest.json unreadable" in result.stderr
    assert len(entries(tmp_path)) == 2


def test_no_wait_fails_clearly_while_another_run_holds_the_lock(tmp_path, recipe):
    ws = Workspace(tmp_path / "ws")
    cli("taskvec", str(recipe), code=None)
    key = next(iter(entries(tmp_path)))
    ws.remove(key)
    (tmp_path / "ws" / "locks").mkdir(exist_ok=True)
    with open(tmp_path / "ws" / "locks" / f"{key}.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        result = cli("--no-wait", "taskvec", str(recipe), code=None)
    assert result.exit_code == 3 and "another run is building" in result.stderr


def test_two_processes_on_one_workspace_both_succeed_with_identical_results(tmp_path, recipe):
    cmd = [sys.executable, "-m", "mergecli", "-q", "merge", str(recipe)]
    procs = [subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    assert len(entries(tmp_path)) == 2
    together = (tmp_path / "out" / "ties" / "model.safetensors").read_bytes()
    assert not list(tmp_path.glob("out/.*.tmp"))
    alone = cli("merge", recipe, "workspace=ws_alone", "output_dir=out_alone")
    assert "task vector a (full, read from the fine-tune at merge time): computed" in alone.stderr
    assert (tmp_path / "out_alone" / "ties" / "model.safetensors").read_bytes() == together


class ToySpec(ArtifactSpec):
    """An artifact kind of the tests' own: the workspace serves any declared kind alike."""

    kind = "toy"
    x: int


def test_interrupted_build_leaves_no_entry_and_gc_removes_leftovers(tmp_path, recipe):
    ws = Workspace(tmp_path / "ws")

    def killed(folder):
        (folder / "part.bin").write_bytes(b"123")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        ws.get_or_build(ToySpec(x=1), "half", killed)
    assert ws.find(ToySpec(x=1)) is None and not list((tmp_path / "ws" / "toy").iterdir())
    # a SIGKILLed run leaves its (marked) temp folder behind: gc removes it, and unused artifacts too
    cli("taskvec", str(recipe), code=None)
    leftover = tmp_path / "ws" / "taskvec" / ".0123456789abcdef0123.1234abcd.tmp"
    leftover.mkdir()
    (leftover / ".mergecli-owned").write_text("workspace artifact")
    ws.get_or_build(ToySpec(x=2), "unused", lambda f: (f / "x").write_text("x"))
    listed = json.loads(cli("--json", "ws", "ls", str(recipe), code=None).stdout)
    assert {e["label"]: e["used"] for e in listed} == {"taskvec a": True, "taskvec c": True, "unused": False}
    dry = json.loads(cli("--json", "ws", "gc", "--dry-run", str(recipe), code=None).stdout)
    assert len(dry) == 2
    result = json.loads(cli("--json", "ws", "gc", str(recipe), code=None).stdout)
    assert result["removed"] == 2
    assert {e["label"] for e in entries(tmp_path).values()} == {"taskvec a", "taskvec c"}
    again = cli("taskvec", str(recipe), code=None)
    assert again.stderr.count("reused") == 2


def test_every_field_of_every_artifact_spec_is_in_its_key(tmp_path, models):
    """Keys hash the whole spec: change any field of any planned spec and the key changes."""
    from mergecli import load_recipe
    from mergecli.stages import stages
    from mergecli.stages.base import Context

    write_jsonl(tmp_path / "code.jsonl", CODE)
    recipe = write_recipe(tmp_path / "r.yaml", str(models / "base"),
                          [{"name": "a", "model": str(models / "ft_a"), "dataset": {"path": "./code.jsonl"}}],
                          [{"name": "rm", "method": "regmean"}])
    ctx = Context(load_recipe(recipe))
    specs = [spec for stage in stages().values() for spec in stage.plan(ctx)]
    assert {s.kind for s in specs} == {"taskvec", "hessian", "merge", "eval"}
    for spec in specs:
        for field, value in spec:
            other = {**value, "changed": 1} if isinstance(value, dict) else (*value, "changed") \
                if isinstance(value, tuple) else f"{value}-changed"
            assert spec.model_copy(update={field: other}).key() != spec.key(), (spec.kind, field)
