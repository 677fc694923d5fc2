"""SIGKILL at random points of a real run, then the same command again: the result must be
bit-identical to a run that was never interrupted, and nothing half-written may be trusted."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import CODE, write_jsonl, write_recipe
from mergecli.store.workspace import Workspace



def run(recipe: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mergecli", "-q", "merge", str(recipe), *overrides],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})


def weights(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.safetensors"))}


@pytest.fixture(scope="module")
def clean(tmp_path_factory, models):
    root = tmp_path_factory.mktemp("recovery")
    write_jsonl(root / "code.jsonl", CODE)
    recipe = write_recipe(root / "r.yaml", str(models / "base"), [
        {"name": "a", "model": str(models / "ft_a"), "dataset": {"path": "./code.jsonl"}},
        {"name": "b", "model": str(models / "ft_b"), "dataset": {"path": "./code.jsonl"}},
        {"name": "c", "model": str(models / "lora_c"), "dataset": {"path": "./code.jsonl"}},
    ], [{"name": "ties", "method": "ties"}, {"name": "dare", "method": "dare_ties", "seed": 3},
        {"name": "sg", "method": "ties", "score": "sparsegpt", "compensate": True},
        {"name": "regmean", "method": "regmean"}],
        calibration={"samples": 4, "seq_len": 16}, shard_size="40KB")
    start = time.perf_counter()
    proc = run(recipe, "workspace=ws_clean", "output_dir=out_clean")
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    return recipe, weights(root / "out_clean"), time.perf_counter() - start


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigkill_then_rerun_is_identical_to_an_uninterrupted_run(clean, seed):
    recipe, expected, duration = clean
    root = recipe.parent
    ws, out = f"ws_{seed}", f"out_{seed}"
    proc = run(recipe, f"workspace={ws}", f"output_dir={out}")
    time.sleep(random.Random(seed).uniform(0.5, duration))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # whatever the kill left, every manifest entry that exists is complete and valid
    workspace = Workspace(root / ws)
    for artifact in workspace.artifacts():
        assert Workspace.verify(artifact) is None
    assert run(recipe, f"workspace={ws}", f"output_dir={out}").wait(timeout=300) == 0
    assert weights(root / out) == expected
    assert not list((root / out).glob(".*.tmp"))


def test_temp_folders_of_a_killed_merge_are_cleared_by_the_next_run(clean):
    """A temp folder carrying mergecli's marker is a leftover of a killed run and is removed; one
    without it is somebody else's, however it is named, and stays."""
    recipe, expected, _ = clean
    root = recipe.parent
    out = root / "out_stale"
    (out / ".ties.deadbeef.tmp").mkdir(parents=True)
    (out / ".ties.deadbeef.tmp" / ".mergecli-owned").write_text("merged model")
    (out / ".ties.deadbeef.tmp" / "model.safetensors").write_bytes(b"half")
    (out / ".ties.cafebabe.tmp").mkdir()
    (out / ".ties.cafebabe.tmp" / "notes.txt").write_text("not mergecli's")
    assert run(recipe, "workspace=ws_clean", "output_dir=out_stale").wait(timeout=300) == 0
    assert not (out / ".ties.deadbeef.tmp").exists() and weights(out) == expected
    assert (out / ".ties.cafebabe.tmp" / "notes.txt").read_text() == "not mergecli's"
