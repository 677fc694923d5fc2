"""Extending mergecli: a new merge method is one module dropped into `methods/` (one decorated
function, its parameters declared with it), a new stage is one module. Nothing else is edited: the
recipe validates the method's parameters, cache keys include them, and the stage gets its command,
its `run_<name>` function and its place in `ws ls`/`ws gc` from the stage list."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers import cli
TOY_METHOD = '''"""shrunk_mean: a method added by dropping this module into methods/."""

from .table import LAMBDA, Param, register_method


@register_method("shrunk_mean", params=(Param("shrink", float, 0.5, "how far towards the base", low=0, high=1),
                                        LAMBDA))
def shrunk_mean(trimmed, weights, *, params, **_):
    """(1 - shrink) * the weighted mean of the task vectors."""
    return (1 - params["shrink"]) * sum(w * t for w, t in zip(weights.tolist(), trimmed)) / weights.sum()
'''

TOY_STAGE = '''"""toy stage: how many tensors each fine-tune has, cached per fine-tune."""

import json

from mergecli.store.artifacts import ArtifactSpec
from mergecli.stages.base import Stage, View


class TensorCountSpec(ArtifactSpec):
    kind = "tensorcount"
    model: str


def spec_of(ctx, model):
    return TensorCountSpec(model=ctx.source(model.model).fingerprint)


def run(ctx):
    from mergecli.models.safetensors_io import Checkpoint

    counts = []
    for model in ctx.recipe.models:
        def produce(folder, model=model):
            names = Checkpoint.open(ctx.source(model.model).path).names()
            (folder / "count.json").write_text(json.dumps(len(names)))
        artifact, reused = ctx.get_or_build(spec_of(ctx, model), f"count {model.name}", produce)
        counts.append({"model": model.name, "tensors": json.loads((artifact.path / "count.json").read_text()),
                       "reused": reused})
    return counts


STAGE = Stage("toy", "Count each fine-tune's tensors.", run=run, order=60,
              show=lambda counts: View("tensors", ["model", "tensors"], [[c["model"], c["tensors"]] for c in counts],
                                       counts),
              plan=lambda ctx: [spec_of(ctx, m) for m in ctx.recipe.models])
'''


@pytest.fixture
def toy_stage(tmp_path):
    import mergecli.app.api
    import mergecli.app.cli
    import mergecli.stages as stages

    package = tmp_path / "plugins"
    package.mkdir()
    (package / "toy.py").write_text(TOY_STAGE)
    stages.__path__.append(str(package))
    stages.stages.cache_clear()
    yield importlib.reload(mergecli.app.api), importlib.reload(mergecli.app.cli)
    stages.__path__.remove(str(package))
    stages.stages.cache_clear()
    importlib.reload(mergecli.app.api)
    importlib.reload(mergecli.app.cli)


def recipe(tmp_path, models, merge: dict):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"base": str(models / "base"), "workspace": "ws", "output_dir": "out",
                                    "models": [{"name": "a", "model": str(models / "ft_a")},
                                               {"name": "b", "model": str(models / "ft_b")}],
                                    "merges": [merge]}))
    return path


def test_a_new_method_is_one_module_dropped_into_methods(tmp_path, models):
    """A copy of the package with one more file in methods/: discovered, not listed anywhere."""
    package = Path(__file__).resolve().parent.parent / "mergecli"
    copy = tmp_path / "copy"
    shutil.copytree(package, copy / "mergecli", ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "mergecli" / "methods" / "shrunk.py").write_text(TOY_METHOD)
    env = {**os.environ, "PYTHONPATH": str(copy), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}

    def mergecli(*args):
        return subprocess.run([sys.executable, "-m", "mergecli", *map(str, args)], capture_output=True, text=True,
                              env=env, cwd=copy, timeout=300)

    path = recipe(tmp_path, models, {"name": "s", "method": "shrunk_mean", "shrink": 0.25})
    listed = mergecli("validate", path, "merges.s.method=shrunk")
    assert listed.returncode == 2 and "shrunk_mean" in listed.stderr  # among the known methods
    done = mergecli("merge", path)
    assert done.returncode == 0, done.stderr
    out, base = load_file(tmp_path / "out" / "s" / "model.safetensors"), load_file(models / "base" / "model.safetensors")
    a, b = load_file(models / "ft_a" / "model.safetensors"), load_file(models / "ft_b" / "model.safetensors")
    name = "model.layers.1.self_attn.o_proj.weight"
    assert torch.allclose(out[name], base[name] + 0.75 * ((a[name] - base[name]) + (b[name] - base[name])) / 2,
                          atol=1e-6)
    assert "merge s: wrote" in mergecli("merge", path, "merges.s.shrink=0.5").stderr  # the parameter is in the key
    assert "shrink: must be in [0, 1], got 2" in mergecli("validate", path, "merges.s.shrink=2").stderr
    assert "(did you mean 'shrink'?)" in mergecli("validate", path, "merges.s.shrnk=0.1").stderr
    assert "shrunk_mean" not in cli("validate", path, code=2).stderr.split("known:")[-1]  # only in the copy


def test_a_new_stage_is_one_module(tmp_path, models, toy_stage):
    api, _ = toy_stage
    path = recipe(tmp_path, models, {"name": "t", "method": "ties"})
    n = len(load_file(models / "ft_a" / "model.safetensors"))
    first = json.loads(cli("--json", "toy", path).stdout)
    assert [(c["model"], c["tensors"], c["reused"]) for c in first] == [("a", n, False), ("b", n, False)]
    assert all(c["reused"] for c in json.loads(cli("--json", "toy", path).stdout))
    assert "Count each fine-tune's tensors." in cli("--help").stdout
    from mergecli import load_recipe

    assert [c["tensors"] for c in api.run_toy(load_recipe(path))] == [n, n]
    listed = json.loads(cli("--json", "ws", "ls", path).stdout)
    assert {e["label"]: e["used"] for e in listed} == {"count a": True, "count b": True}
    assert json.loads(cli("--json", "ws", "gc", path).stdout)["removed"] == 0
