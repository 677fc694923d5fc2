"""`mergecli demo` on a tiny GGUF model and two-step fine-tunes: it says what it will write and where
before writing it, writes every model in the base's dtype family (bf16), prints the comparison
that compare.md holds, and no library chatter. The real model runs in test_demo_slow.py."""

import dataclasses
import json
import re

import pytest
from typer.testing import CliRunner

from helpers import make_gguf
from mergecli.app import demo
from mergecli.app.cli import app
from mergecli.models.safetensors_io import read_header

runner = CliRunner()
SMALL = ["calibration.samples=4", "calibration.seq_len=32", "evaluation.samples=2", "evaluation.seq_len=32"]
CHATTER = re.compile(r"warn|it/s|%\||deprecat|generation flags", re.IGNORECASE)


@pytest.fixture
def tiny_demo(tmp_path, models, monkeypatch):
    monkeypatch.setenv("MERGECLI_CACHE", str(tmp_path / "cache"))
    gguf = make_gguf(models / "base", tmp_path / "tiny.gguf")
    monkeypatch.setattr(demo, "fetch_base", lambda reporter: gguf)
    monkeypatch.setattr(demo, "FINE_TUNES", {name: (data, dataclasses.replace(settings, steps=2, batch_size=2,
                                                                              seq_len=32))
                                             for name, (data, settings) in demo.FINE_TUNES.items()})
    return tmp_path / "demo"


def merged(workdir):
    return sorted(p for p in (workdir / "merged").iterdir() if p.is_dir() and not p.name.startswith("."))


def dtypes(folder):
    return {info["dtype"] for f in folder.glob("*.safetensors")
            for name, info in read_header(f).items() if name != "__metadata__"}


def test_demo_says_what_it_writes_writes_bf16_and_nothing_else_talks(tiny_demo, capfd):
    result = runner.invoke(app, ["demo", "--workdir", str(tiny_demo), *SMALL], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.stderr
    err = result.stderr + capfd.readouterr().err  # library loggers may write to the real stderr
    assert not CHATTER.search(err), err
    announce = next(i for i, line in enumerate(err.splitlines()) if "the demo's files take about" in line)
    assert str(tiny_demo) in err.splitlines()[announce]
    assert announce < min(i for i, line in enumerate(err.splitlines()) if "fine-tune" in line)
    assert re.search(r"the folder holds \d+\.\d (KiB|MiB|GiB)", err)
    for folder in [tiny_demo / "models" / m for m in ("base", "code-full", "verse-full")] + \
            merged(tiny_demo):
        assert dtypes(folder) == {"BF16"}, folder
        assert json.loads((folder / "config.json").read_text()).get("dtype") == "bfloat16", folder
    assert len(merged(tiny_demo)) == 8
    assert max(map(len, result.stdout.splitlines())) <= 80 and "★" in result.stdout
    md = (tiny_demo / "compare.md").read_text().splitlines()
    assert md[0] == "| model | code | verse | arithmetic | mean | gain kept | vs own FT | method | kept | merge s |"
    assert (tiny_demo / "compare.png").stat().st_size > 20_000

    again = runner.invoke(app, ["demo", "--workdir", str(tiny_demo), *SMALL])
    assert again.exit_code == 0 and "the demo's files take" not in again.stderr
    assert "computed" not in again.stderr and "base (bfloat16): reused" in again.stderr


def test_the_estimate_counts_every_model_task_vector_and_hessian(tmp_path, models):
    from transformers import AutoModelForCausalLM

    from mergecli.recipe.load import load_recipe

    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text((demo.data_dir() / "recipe.yaml").read_text().replace("DATA", str(demo.data_dir())))
    model = AutoModelForCausalLM.from_pretrained(models / "base")
    sizes = demo.disk_estimate(model, load_recipe(recipe_path, check_paths=False))
    params = sum(p.numel() for p in model.parameters())
    # the tiny LLaMA, per layer: q 32x32, k and v 16x32, o 32x32, gate and up 64x32, down 32x64
    lora = 2 * (1024 + 512 + 512 + 1024 + 3 * 2048) * 4  # the LoRA fine-tune's task vector, fp32
    adapter = 2 * (64 + 48 + 48 + 64 + 3 * 96) * 16 * 4  # its rank-16 A and B, fp32
    hessians = 2 * (3 * 32 ** 2 + 64 ** 2) * 4  # inputs: q/k/v share one, o, gate/up share one, down
    assert sizes == {"models": 3 * 2 * params + adapter, "workspace": lora + 3 * hessians, "merged": 8 * 2 * params}
