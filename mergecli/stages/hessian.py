"""hessian stage: per fine-tune, H = X^T X of every linear layer's inputs on its own calibration data.

Artifacts (one per fine-tune, keyed by the model that ran, the dataset spec and the calibration
settings) hold `hessian.safetensors` (one fp32 H sum per input group) and
`hessian.json` (weight name -> group, token count per group). Sums are stored with their token
count so they add up exactly; consumers use G = H / n.
"""

from __future__ import annotations

import json
import shutil
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from ..calibration import describe_spec, load_texts, make_windows
from ..collect import collect, decoder_layers, find_groups, linear_modules
from ..errors import MergeCliError
from ..methods.stats import LayerStats
from ..models.reference import ModelSource, tokenizer_folder
from ..models.safetensors_io import Checkpoint, StreamingWriter, TensorInfo
from ..progress import SILENT, Reporter
from ..recipe import ModelSpec, Recipe
from ..workspace import Artifact
from .common import Context, check_device, open_context

FILENAME = "hessian.safetensors"
META = "hessian.json"


@dataclass(frozen=True)
class HessianSet:
    model: str
    artifact: Artifact
    reused: bool

    @property
    def meta(self) -> dict:
        return json.loads((self.artifact.path / META).read_text())


def run_hessian(recipe: Recipe, reporter: Reporter = SILENT, wait: bool = True, device: str = "cpu",
                ctx: Context | None = None, models: list[ModelSpec] | None = None) -> list[HessianSet]:
    """Collect (or reuse) calibration statistics for every fine-tune with a dataset."""
    dev = check_device(device)
    ctx = ctx or open_context(recipe, reporter, wait)
    chosen = models if models is not None else [m for m in recipe.models if m.dataset is not None]
    if not chosen:
        raise MergeCliError("no fine-tune in the recipe has a dataset to calibrate on",
                            "add models.N.dataset: {path: ..., text_field: text}")
    return [hessian_set(ctx, spec, dev) for spec in chosen]


def hessian_set(ctx: Context, spec: ModelSpec, device: torch.device) -> HessianSet:
    if spec.dataset is None:
        raise MergeCliError(f"models.{spec.name}.dataset is needed for calibration statistics")
    source = ctx.source(spec.model)
    inputs = hessian_inputs(ctx.recipe, spec, ctx.base, source)

    def produce(folder: Path) -> None:
        _produce(ctx, spec, source, folder, device)

    artifact, reused = ctx.workspace.get_or_build("hessian", inputs, f"hessian {spec.name}", produce)
    ctx.reporter.log(f"hessians [bold]{spec.name}[/]: " + ("reused from the workspace cache" if reused else "collected"))
    return HessianSet(spec.name, artifact, reused)


def hessian_inputs(recipe: Recipe, spec: ModelSpec, base: ModelSource, source: ModelSource) -> dict:
    """What a Hessian set's cache key depends on (not batch size or runner: they do not change H)."""
    cal = recipe.calibration
    ran = {"base": base.fingerprint} if cal.source == "base" else {"base": base.fingerprint, "model": source.fingerprint}
    return {**ran, "dataset": spec.dataset.model_dump() if spec.dataset else None, "samples": cal.samples,
            "seq_len": cal.seq_len, "seed": cal.seed, "pack": cal.pack, "source": cal.source}


def load_model(ctx: Context, source: ModelSource, use_base: bool):
    """The model whose activations are collected (LoRA: base + adapter, merged) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder(source.path, ctx.base.path))
    if use_base or source.kind == "lora":
        model = AutoModelForCausalLM.from_pretrained(ctx.base.path, dtype=torch.float32)
        if not use_base:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, source.path).merge_and_unload()
        return model.eval(), tokenizer
    return AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32).eval(), tokenizer


def _produce(ctx: Context, spec: ModelSpec, source: ModelSource, folder: Path, device: torch.device) -> None:
    cal = ctx.recipe.calibration
    model, tokenizer = load_model(ctx, source, cal.source == "base")
    texts = load_texts(spec.dataset, ctx.recipe.root, tokenizer)
    windows = make_windows(texts, tokenizer, cal.samples, cal.seq_len, cal.seed, cal.pack,
                           what=f"dataset {describe_spec(spec.dataset)} of {spec.name}")
    groups = find_groups(model, windows.input_ids)
    modules = linear_modules(model)
    dims = {leader: _in_features(modules[leader]) for leader in groups}
    size = sum(d * d * 4 for d in dims.values())
    free = shutil.disk_usage(folder).free
    ctx.reporter.log(f"hessians {spec.name}: {len(groups)} input groups for {sum(map(len, groups.values()))} "
                     f"linear layers, {size / 2**20:.1f} MiB on disk; {windows.tokens} tokens")
    if size > free:
        raise MergeCliError(f"hessians of {spec.name} need {size / 2**30:.2f} GiB, the workspace disk has "
                            f"{free / 2**30:.2f} GiB free", "free space or point --workspace elsewhere")
    steps = len(decoder_layers(model)) if cal.layer_by_layer else windows.input_ids.shape[0]
    with ctx.reporter.track(f"hessians {spec.name}", steps) as advance:
        stats = collect(model, windows, groups, cal.batch_size, device, cal.layer_by_layer, advance)
    infos = [TensorInfo(f"{leader}.H", (dims[leader], dims[leader]), torch.float32) for leader in groups]
    writer = StreamingWriter(folder / FILENAME, infos, {"model": spec.name})
    try:
        for leader in groups:
            writer.write(f"{leader}.H", stats.sums[leader].float())
        writer.close()
    except BaseException:
        writer.abort()
        raise
    (folder / META).write_text(json.dumps({
        "model": spec.name, "dataset": describe_spec(spec.dataset), "tokens": windows.tokens,
        "members": stats.members, "counts": stats.counts, "groups": groups}, indent=1))


def _in_features(module: torch.nn.Module) -> int:
    return module.in_features if hasattr(module, "in_features") else module.weight.shape[0]  # Conv1D: in x out


class HessianReader:
    """Per-tensor statistics for the merge: G = H / n of the tensor's input group, a few kept in memory."""

    def __init__(self, hessians: HessianSet, damp: float, device: torch.device = torch.device("cpu"),
                 keep: int = 3) -> None:
        meta = hessians.meta
        self._members: dict[str, str] = meta["members"]
        self._counts: dict[str, int] = meta["counts"]
        self._ckpt = Checkpoint.open(hessians.artifact.path)
        self._damp = damp
        self._device = device
        self._keep = keep
        self._cache: OrderedDict[str, LayerStats] = OrderedDict()
        self._lock = threading.Lock()  # the merge asks from several worker threads

    def stats(self, weight_name: str) -> LayerStats | None:
        group = self._members.get(weight_name)
        if group is None:
            return None
        with self._lock:
            if group not in self._cache:
                gram = self._ckpt.get(f"{group}.H").to(self._device, torch.float64) / max(self._counts[group], 1)
                self._cache[group] = LayerStats(gram, self._damp)
                if len(self._cache) > self._keep:
                    self._cache.popitem(last=False)
            self._cache.move_to_end(group)
            return self._cache[group]
