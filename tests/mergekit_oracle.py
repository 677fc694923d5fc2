"""mergekit configs merged by an independent composition: the translated recipe's settings
resolved per tensor with `mergecli.methods.schedule`, the math done by `mergecli.methods`' pure functions
called directly (not the merge pipeline: no chunking, no trim planning, no threads, no stage).

Used by the CLI tests (a `mergecli merge` of each config must match it) and by
`benchmarks/mergekit_reference.py` (which also emulates mergekit's rounding with it, to explain
the differences from mergekit's own output). Also builds the tiny models the configs name.
"""

from __future__ import annotations

from pathlib import Path
from string import Template
from typing import Any

import torch

from helpers import make_llama, make_lora
from mergecli.methods import schedule
from mergecli.methods.combine import disjoint_mean, weighted_sum
from mergecli.methods.consensus import disjoint_sum, weighted_mean
from mergecli.methods.interpolate import slerp, weighted_average
from mergecli.methods.selective import arcee_fusion, nearswap, ram, ramplus_tl, sce
from mergecli.methods.spherical import karcher, multislerp, nuslerp, nuslerp_t
from mergecli.methods.masks import breadcrumbs_mask, della_probabilities, l1_rescale, sample_mask
from mergecli.methods.sparsify import random_stream, topk_mask
from mergecli.methods.stock import model_stock
from mergecli.models.architecture import Architecture

CONFIGS = Path(__file__).parent / "mergekit_configs"
LAYERS = 4
RANDOM = {"dare_ties", "dare_linear", "della", "della_linear"}
SPHERICAL = {"nuslerp": "base", "multislerp": "base", "karcher": "zero"}  # and their default origin
LAYER_OF = Architecture("llama", {}, frozenset(), frozenset(), LAYERS).layer_of


def render(name: str, paths: dict[str, Path], folder: Path) -> Path:
    """Config `name` of CONFIGS with the model paths filled in, written into `folder`."""
    text = Template((CONFIGS / f"{name}.yml").read_text()).substitute({k: str(v) for k, v in paths.items()})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.yml").write_text(text)
    return folder / f"{name}.yml"


# -- tiny models -------------------------------------------------------------------------------
def build_models(work: Path) -> dict[str, Path]:
    """An untied 4-layer LLaMA base; ft_a/b/c = base + a shared update + their own (so their task
    vectors meet at a real angle, as fine-tunes of one base do); ft_far = base + a large update
    (SLERP's spherical branch); lora_c = a rank-4 adapter on q/v."""
    from transformers import AutoModelForCausalLM

    paths = {name: work / "models" / name for name in ("base", "ft_a", "ft_b", "ft_c", "ft_far", "lora_c")}
    if all((p / "config.json").is_file() or (p / "adapter_config.json").is_file() for p in paths.values()):
        return paths
    make_llama(paths["base"], seed=0, layers=LAYERS, tie=False)
    shared = torch.Generator().manual_seed(100)
    base = AutoModelForCausalLM.from_pretrained(paths["base"]).eval()
    common = {n: torch.randn(p.shape, generator=shared) * 0.01 for n, p in base.named_parameters()}
    for index, name in enumerate(("ft_a", "ft_b", "ft_c", "ft_far")):
        model = AutoModelForCausalLM.from_pretrained(paths["base"]).eval()
        g = torch.Generator().manual_seed(index + 1)
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if name == "ft_far":
                    param.add_(torch.randn(param.shape, generator=g) * 0.3)
                else:
                    param.add_(common[param_name] + torch.randn(param.shape, generator=g) * 0.01)
        model.save_pretrained(paths[name])
    make_lora(paths["base"], paths["lora_c"], seed=3)
    for name in ("ft_a", "ft_b", "ft_c", "ft_far"):  # mergekit copies the tokenizer from the base
        for file in paths["base"].glob("tokenizer*"):
            (paths[name] / file.name).write_bytes(file.read_bytes())
    return paths


def load_folder(folder: Path) -> dict[str, torch.Tensor]:
    from mergecli.models.safetensors_io import Checkpoint

    ckpt = Checkpoint.open(folder)
    return {name: ckpt.get(name) for name in ckpt.names()}


def model_tensors(ref: str, base: dict[str, torch.Tensor], base_folder: Path) -> dict[str, torch.Tensor]:
    """A recipe model's full weights: a checkpoint, or base + mergecli's LoRA task vector."""
    folder = Path(ref)
    if not (folder / "adapter_config.json").is_file():
        return load_folder(folder)
    from mergecli.models.architecture import describe
    from mergecli.models.lora import LoraAdapter
    from mergecli.models.safetensors_io import Checkpoint

    adapter, arch, ckpt = LoraAdapter(folder), describe(base_folder), Checkpoint.open(base_folder)
    out = dict(base)
    for name in adapter.tensor_names(arch):
        out[name] = base[name] + adapter.delta(name, name, ckpt, arch)
    return out


# -- the merge, composed ----------------------------------------------------------------------
def _param(variant: dict, entry: Any, key: str, name: str, default: Any = None) -> Any:
    """Per-model value (the model entry first, then the variant), resolved for tensor `name`."""
    own = entry.get(key) if isinstance(entry, dict) else None
    coerce = bool if isinstance(default, bool) else float
    return schedule.resolve_first([own, variant.get(key)], name, LAYER_OF(name), LAYERS, coerce=coerce,
                                  default=default)


def _keep_fraction(fraction: float, n: int, mergekit_rounding: bool) -> float:
    """A fraction whose round(f n) is mergekit's int(f n) when emulating its rounding."""
    return int(fraction * n) / n if mergekit_rounding else fraction


def _mergekit_order_mask(tau: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """Entries ranked [start, start + count) by |tau| descending in the order torch.argsort gives
    (the ranking mergekit uses, which breaks ties its own way); for the explanation only."""
    mask = torch.zeros(tau.numel(), dtype=torch.bool)
    mask[torch.argsort(tau.abs().reshape(-1).float(), descending=True)[start:start + count]] = True
    return mask.reshape(tau.shape)


def reference_tensor(variant: dict, name: str, base: torch.Tensor, thetas: list[torch.Tensor], seed: int = 0,
                     mergekit_rounding: bool = False, mergekit_ties: bool = False) -> torch.Tensor:
    """One merged tensor, composed from mergecli's pure functions.

    `mergekit_rounding`: keep int(d n) entries as mergekit; `mergekit_ties`: also rank TIES'
    entries by torch.argsort as mergekit does (its own order among equal magnitudes)."""
    method = variant["method"]
    entries = variant["models"]
    b = base.float()
    taus = [(theta - base).float() for theta in thetas]  # in the inputs' dtype, as mergekit subtracts
    n = b.numel()
    lam = _param(variant, None, "lambda", name, 1.0)
    weights = torch.tensor([_param(variant, e, "weight", name, 1.0) for e in entries], dtype=torch.float32)
    if method == "slerp":
        return slerp(b, thetas[0].float(), _param(variant, None, "t", name))
    if method == "linear":
        return b + weighted_average(b, taus, weights.tolist(), _param(variant, None, "base_weight", name, 0.0),
                                    _param(variant, None, "normalize", name, True))
    if method == "model_stock":
        return b + model_stock(taus, _param(variant, None, "filter_wise", name, False))
    if method in SPHERICAL:
        return _spherical(variant, name, b, thetas, taus, weights.tolist())
    if method == "sce":
        return b + sce(taus, _param(variant, None, "select_topk", name, 1.0))
    if method == "nearswap":
        return nearswap(b, taus[0], _param(variant, None, "t", name))
    if method == "arcee_fusion":
        return b + arcee_fusion(b, taus[0])
    if method == "ram":
        return b + ram(taus, _param(variant, None, "epsilon", name, 1e-5))
    if method == "ramplus_tl":
        return b + ramplus_tl(taus, _param(variant, None, "r", name, 0.1), _param(variant, None, "alpha", name, 0.2),
                              _param(variant, None, "epsilon", name, 1e-5))
    trimmed = []
    for index, (entry, tau) in enumerate(zip(entries, taus)):
        density = _param(variant, entry, "density", name, 1.0)
        stream = random_stream(seed, name, index)
        if method == "task_arithmetic" or density >= 1:
            kept = tau
        elif method == "ties" and mergekit_ties:
            kept = tau * _mergekit_order_mask(tau, 0, max(1, int(density * n)))
        elif method == "ties":
            kept = tau * topk_mask(tau.abs(), _keep_fraction(density, n, mergekit_rounding))
        elif method.startswith("breadcrumbs"):
            gamma = _param(variant, entry, "gamma", name, 0.01)
            kept = tau * breadcrumbs_mask(tau.abs(), _keep_fraction(density, n, mergekit_rounding),
                                          _keep_fraction(gamma, n, mergekit_rounding))
        elif method.startswith("dare"):
            kept = tau * sample_mask(torch.full(tau.shape, density, dtype=torch.float64), stream)
        elif method.startswith("della"):
            probabilities = della_probabilities(tau.abs(), density, _param(variant, entry, "epsilon", name, 0.15))
            kept = tau * sample_mask(probabilities, stream)
        else:
            raise ValueError(method)
        if variant.get("rescale") == "l1" and method != "task_arithmetic" and density < 1:
            kept = l1_rescale(tau, kept)
        trimmed.append(kept)
    normalize = variant.get("normalize", False)
    if method in ("ties", "dare_ties", "breadcrumbs_ties", "della"):
        delta = disjoint_mean(trimmed, weights) if normalize else disjoint_sum(trimmed, weights)
    else:
        delta = weighted_mean(trimmed, weights) if normalize else weighted_sum(trimmed, weights)
    return b + lam * delta


def _spherical(variant: dict, name: str, b: torch.Tensor, thetas: list[torch.Tensor], taus: list[torch.Tensor],
               weights: list[float]) -> torch.Tensor:
    """nuslerp, multislerp, karcher: the points are the task vectors (origin: base, the result added
    to the base) or the weights themselves, the base first with base_weight (origin: zero)."""
    method = variant["method"]
    zero = variant.get("origin", SPHERICAL[method]) == "zero"
    if zero:
        points, w = [b, *(theta.float() for theta in thetas)], [_param(variant, None, "base_weight", name, 1.0),
                                                                  *weights]
    else:
        points, w = taus, weights
    if method == "nuslerp":
        merged = nuslerp(nuslerp_t(*w), *points, _param(variant, None, "nuslerp_flatten", name, True),
                         _param(variant, None, "nuslerp_row_wise", name, False))
    elif method == "multislerp":
        merged = points[0] if len(points) == 1 else multislerp(
            points, w, _param(variant, None, "normalize_weights", name, True), _param(variant, None, "eps", name, 1e-8))
    else:  # karcher: alphas are the weights over their sum; a point of weight 0 takes no part
        kept = [(p, x / sum(w)) for p, x in zip(points, w) if x != 0]
        merged = karcher([p for p, _ in kept], [a for _, a in kept], int(_param(variant, None, "max_iter", name, 10)),
                         _param(variant, None, "tol", name, 1e-5))
    return merged if zero else b + merged


def reference_merge(recipe: dict, root: Path, seed: int = 0, mergekit_rounding: bool = False,
                    input_dtype: torch.dtype | None = None, mergekit_ties: bool = False) -> dict[str, torch.Tensor]:
    """Every merged tensor of the recipe (its paths relative to `root`); `input_dtype` rounds the
    inputs to it first and the outputs to it last (what mergekit's `dtype:` does before and after
    its math)."""
    base_folder = root / recipe["base"]
    base = load_folder(base_folder)
    variant = recipe["merges"][0]
    names = [e["name"] if isinstance(e, dict) else e for e in variant["models"]]
    refs = {m["name"]: root / m["model"] for m in recipe["models"]}
    models = [model_tensors(str(refs[n]), base, base_folder) for n in names]

    def rounded(tensor: torch.Tensor) -> torch.Tensor:
        return tensor if input_dtype is None else tensor.to(input_dtype)

    return {name: rounded(reference_tensor(variant, name, rounded(tensor), [rounded(m[name]) for m in models], seed,
                                           mergekit_rounding, mergekit_ties)).float()
            for name, tensor in base.items()}
