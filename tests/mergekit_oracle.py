"""mergekit configs merged by an independent composition: the translated recipe's settings
resolved per tensor with `mergecli.methods.schedule`, the math done by `mergecli.methods`' pure functions
called directly (not the merge pipeline: no chunking, no trim planning, no threads, no stage).

Used by the CLI tests (a `mergecli merge` of each config must match it) and by
`benchmarks/mergekit_reference.py` (which also emulates mergekit's rounding with it, to explain
the differences from mergekit's own output). Also builds the tiny models the configs name.
"""

from __future__ import annotations

import re
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
        return paths | build_vocabulary_models(work, paths["base"])
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
    return paths | build_vocabulary_models(work, paths["base"])


def build_vocabulary_models(work: Path, base: Path) -> dict[str, Path]:
    """Fine-tunes of `base` with vocabularies of their own: ft_tok = the base's tokenizer plus two
    chat tokens (98 rows, the new ones drawn at random); ft_vocab = a tokenizer trained on other
    text (120 tokens, ids unrelated to the base's, rows as many)."""
    from tokenizers import Tokenizer, models as bpe, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    from helpers import CODE, VERSE

    paths = {name: work / "models" / name for name in ("ft_tok", "ft_vocab")}
    if all((p / "config.json").is_file() for p in paths.values()):
        return paths
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    trained = Tokenizer(bpe.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trained.train_from_iterator(VERSE[:40] + CODE[:40], trainers.BpeTrainer(
        vocab_size=120, special_tokens=["<pad>", "<s>", "</s>", "<unk>"]))
    other = PreTrainedTokenizerFast(tokenizer_object=trained, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                    pad_token="<pad>")
    for seed, (name, tok) in enumerate((("ft_tok", tokenizer), ("ft_vocab", other)), start=20):
        model = AutoModelForCausalLM.from_pretrained(base).eval()
        model.resize_token_embeddings(len(tok), mean_resizing=False)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn(param.shape, generator=g) * 0.02)
        model.config.vocab_size = len(tok)
        model.save_pretrained(paths[name])
        tok.save_pretrained(paths[name])
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
def _param(at: tuple[int | None, int] | None, variant: dict, entry: Any, key: str, name: str,
           default: Any = None) -> Any:
    """Per-model value (the model entry first, then the variant), resolved for tensor `name` at
    position `at` (its layer and the number of layers of its block; default: in a 4-layer model)."""
    own = entry.get(key) if isinstance(entry, dict) else None
    coerce = bool if isinstance(default, bool) else float
    layer, count = at if at is not None else (LAYER_OF(name), LAYERS)
    return schedule.resolve_first([own, variant.get(key)], name, layer, count, coerce=coerce, default=default)


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
                     mergekit_rounding: bool = False, mergekit_ties: bool = False,
                     at: tuple[int | None, int] | None = None) -> torch.Tensor:
    """One merged tensor, composed from mergecli's pure functions.

    `mergekit_rounding`: keep int(d n) entries as mergekit; `mergekit_ties`: also rank TIES'
    entries by torch.argsort as mergekit does (its own order among equal magnitudes)."""
    method = variant["method"]
    entries = variant["models"]
    b = base.float()
    taus = [(theta - base).float() for theta in thetas]  # in the inputs' dtype, as mergekit subtracts
    n = b.numel()
    lam = _param(at, variant, None, "lambda", name, 1.0)
    weights = torch.tensor([_param(at, variant, e, "weight", name, 1.0) for e in entries], dtype=torch.float32)
    if method == "slerp":
        return slerp(b, thetas[0].float(), _param(at, variant, None, "t", name))
    if method == "linear":
        return b + weighted_average(b, taus, weights.tolist(), _param(at, variant, None, "base_weight", name, 0.0),
                                    _param(at, variant, None, "normalize", name, True))
    if method == "model_stock":
        return b + model_stock(taus, _param(at, variant, None, "filter_wise", name, False))
    if method in SPHERICAL:
        return _spherical(at, variant, name, b, thetas, taus, weights.tolist())
    if method == "sce":
        return b + sce(taus, _param(at, variant, None, "select_topk", name, 1.0))
    if method == "nearswap":
        return nearswap(b, taus[0], _param(at, variant, None, "t", name))
    if method == "arcee_fusion":
        return b + arcee_fusion(b, taus[0])
    if method == "ram":
        return b + ram(taus, _param(at, variant, None, "epsilon", name, 1e-5))
    if method == "ramplus_tl":
        return b + ramplus_tl(taus, _param(at, variant, None, "r", name, 0.1), _param(at, variant, None, "alpha", name, 0.2),
                              _param(at, variant, None, "epsilon", name, 1e-5))
    trimmed = []
    for index, (entry, tau) in enumerate(zip(entries, taus)):
        density = _param(at, variant, entry, "density", name, 1.0)
        stream = random_stream(seed, name, index)
        if method == "task_arithmetic" or density >= 1:
            kept = tau
        elif method == "ties" and mergekit_ties:
            kept = tau * _mergekit_order_mask(tau, 0, max(1, int(density * n)))
        elif method == "ties":
            kept = tau * topk_mask(tau.abs(), _keep_fraction(density, n, mergekit_rounding))
        elif method.startswith("breadcrumbs"):
            gamma = _param(at, variant, entry, "gamma", name, 0.01)
            kept = tau * breadcrumbs_mask(tau.abs(), _keep_fraction(density, n, mergekit_rounding),
                                          _keep_fraction(gamma, n, mergekit_rounding))
        elif method.startswith("dare"):
            kept = tau * sample_mask(torch.full(tau.shape, density, dtype=torch.float64), stream)
        elif method.startswith("della"):
            probabilities = della_probabilities(tau.abs(), density, _param(at, variant, entry, "epsilon", name, 0.15))
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


def _spherical(at: tuple[int | None, int] | None, variant: dict, name: str, b: torch.Tensor, thetas: list[torch.Tensor], taus: list[torch.Tensor],
               weights: list[float]) -> torch.Tensor:
    """nuslerp, multislerp, karcher: the points are the task vectors (origin: base, the result added
    to the base) or the weights themselves, the base first with base_weight (origin: zero)."""
    method = variant["method"]
    zero = variant.get("origin", SPHERICAL[method]) == "zero"
    if zero:
        points, w = [b, *(theta.float() for theta in thetas)], [_param(at, variant, None, "base_weight", name, 1.0),
                                                                  *weights]
    else:
        points, w = taus, weights
    if method == "nuslerp":
        merged = nuslerp(nuslerp_t(*w), *points, _param(at, variant, None, "nuslerp_flatten", name, True),
                         _param(at, variant, None, "nuslerp_row_wise", name, False))
    elif method == "multislerp":
        merged = points[0] if len(points) == 1 else multislerp(
            points, w, _param(at, variant, None, "normalize_weights", name, True), _param(at, variant, None, "eps", name, 1e-8))
    else:  # karcher: alphas are the weights over their sum; a point of weight 0 takes no part
        kept = [(p, x / sum(w)) for p, x in zip(points, w) if x != 0]
        merged = karcher([p for p, _ in kept], [a for _, a in kept], int(_param(at, variant, None, "max_iter", name, 10)),
                         _param(at, variant, None, "tol", name, 1e-5))
    return merged if zero else b + merged


def reference_merge(recipe: dict, root: Path, seed: int = 0, mergekit_rounding: bool = False,
                    input_dtype: torch.dtype | None = None, mergekit_ties: bool = False,
                    vocabulary: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
    """Every merged tensor of the recipe (its paths relative to `root`); `input_dtype` rounds the
    inputs to it first and the outputs to it last (what mergekit's `dtype:` does before and after
    its math); `vocabulary`: the merged vocabulary (token -> id) a recipe with `tokenizer.source`
    re-maps every model's embedding rows to (`remap_rows`)."""
    base_folder = root / recipe["base"]
    base = load_folder(base_folder)
    variant = recipe["merges"][0]
    refs = {m["name"]: root / m["model"] for m in recipe["models"]}
    remap = None
    if vocabulary is not None:
        folders = {"base": base_folder, **refs}
        remap = lambda ts: remap_rows(vocabulary, recipe.get("tokenizer") or {}, ts, folders, base_folder)  # noqa: E731

    def rounded(tensor: torch.Tensor) -> torch.Tensor:
        return tensor if input_dtype is None else tensor.to(input_dtype)

    if "layers" in variant:
        every = {name: model_tensors(str(ref), base, base_folder) for name, ref in refs.items()}
        return {name: rounded(tensor).float() for name, tensor in
                stacked_reference(variant, base, every, lambda v, n, b, ts, at: reference_tensor(
                    v, n, rounded(b), [rounded(t) for t in ts], seed, mergekit_rounding, mergekit_ties, at),
                    remap).items()}
    names = [e["name"] if isinstance(e, dict) else e for e in variant["models"]]
    models = [model_tensors(str(refs[n]), base, base_folder) for n in names]
    if remap is not None:
        for tensor_name in VOCABULARY_TENSORS & set(base):
            rows = remap({"base": base[tensor_name], **{n: m[tensor_name] for n, m in zip(names, models)}})
            base = {**base, tensor_name: rows["base"]}
            models = [{**m, tensor_name: rows[n]} for n, m in zip(names, models)]

    return {name: rounded(reference_tensor(variant, name, rounded(tensor), [rounded(m[name]) for m in models], seed,
                                           mergekit_rounding, mergekit_ties)).float()
            for name, tensor in base.items()}


LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def stacked_reference(variant: dict, base: dict[str, torch.Tensor], models: dict[str, dict[str, torch.Tensor]],
                      merge: Any, remap: Any = None) -> dict[str, torch.Tensor]:
    """A layer-stacking variant (`layers:`) written out for a LLaMA: output layer o is layer
    first + j of the block holding it, copied (`from`, times `scale` resolved for the tensor read)
    or merged by `merge(block variant, output name, base tensor, model tensors, (j, block length))`
    from the base's layer and each model's own (its `range`); the embedding comes from the first
    block, the final norm and lm_head from the last, at position (None, length)."""
    suffixes = sorted({m.group(2) for name in base if (m := LAYER_NAME.match(name))})
    depth = 1 + max(int(m.group(1)) for name in base if (m := LAYER_NAME.match(name)))
    blocks = variant["layers"]
    given = {k: v for k, v in variant.items() if k not in ("name", "method", "models", "layers", "dtype")}

    def make(block: dict, out_name: str, offset: int | None, length: int, suffix: str | None) -> torch.Tensor:
        if remap is not None and out_name in VOCABULARY_TENSORS:  # each input's rows re-mapped, as its block reads it
            names = [block["from"]] if "from" in block else ["base", *(
                e if isinstance(e, str) else e["name"] for e in block.get("models", variant.get("models")))]
            rows = remap({n: (base if n == "base" else models[n])[out_name] for n in names})
            inputs = {n: {**(base if n == "base" else models[n]), out_name: rows[n]} for n in names}
            return make_from(block, out_name, offset, length, suffix, inputs.get("base", base), inputs)
        return make_from(block, out_name, offset, length, suffix, base, models)

    def make_from(block: dict, out_name: str, offset: int | None, length: int, suffix: str | None,
                  base: dict[str, torch.Tensor], models: dict[str, dict[str, torch.Tensor]]) -> torch.Tensor:
        first, end = block.get("range", [0, depth])

        def read(tensors: dict[str, torch.Tensor], start: int) -> torch.Tensor:
            return tensors[out_name if suffix is None else f"model.layers.{start + offset}.{suffix}"]

        at = (offset, length)
        if "from" in block:
            tensor = read(base if block["from"] == "base" else models[block["from"]], first)
            name = out_name if suffix is None else f"model.layers.{first + offset}.{suffix}"
            scale = schedule.resolve_first([block.get("scale")], name, offset, length)
            return tensor if scale is None else tensor.float() * scale
        entries = block.get("models", variant.get("models"))
        own = {k: v for k, v in block.items() if k not in ("range", "method", "models")}
        inner = {**given, **own, "method": block.get("method", variant["method"]),
                 "models": [e if isinstance(e, str) else {k: v for k, v in e.items() if k != "range"}
                            for e in entries]}
        thetas = [read(models[e if isinstance(e, str) else e["name"]],
                       e["range"][0] if isinstance(e, dict) and "range" in e else first) for e in entries]
        return merge(inner, out_name, read(base, first), thetas, at)

    out: dict[str, torch.Tensor] = {}
    first_block, last_block = blocks[0], blocks[-1]
    length_of = [b.get("range", [0, depth])[1] - b.get("range", [0, depth])[0] for b in blocks]
    out["model.embed_tokens.weight"] = make(first_block, "model.embed_tokens.weight", None, length_of[0], None)
    written = 0
    for block, length in zip(blocks, length_of):
        for offset in range(length):
            for suffix in suffixes:
                name = f"model.layers.{written}.{suffix}"
                out[name] = make(block, name, offset, length, suffix)
            written += 1
    for name in base:
        if name not in out and not LAYER_NAME.match(name):
            out[name] = make(last_block, name, None, length_of[-1], None)
    return out


VOCABULARY_TENSORS = {"model.embed_tokens.weight", "lm_head.weight"}


def remap_rows(vocabulary: dict[str, int], spec: dict, tensors: dict[str, torch.Tensor], folders: dict[str, Path],
               base_folder: Path) -> dict[str, torch.Tensor]:
    """mergekit 0.1.5's `PermutedVocabulary.execute` transcribed token by token (dicts and loops, as
    its source is written): each input's rows (`tensors`, keyed as the recipe names the models,
    `base` for the base) set to the merged vocabulary; an input's own vocabulary is its folder's
    tokenizer (a LoRA's, or a folder without one: the base's), its rows as many as its config says."""
    import json

    from transformers import AutoTokenizer

    def own(key: str) -> tuple[dict[str, int], int]:
        folder = folders[key]
        if (folder / "adapter_config.json").is_file() or not (folder / "tokenizer.json").is_file():
            folder = base_folder
        rows = json.loads((folder / "config.json").read_text())["vocab_size"]
        return AutoTokenizer.from_pretrained(folder).get_vocab(), rows

    models = list(tensors)
    permutations = {}
    originals = {}
    for key in models:
        vocab, rows = own(key)
        originals[key] = vocab
        permutations[key] = {i: (vocab[t] if t in vocab and vocab[t] < rows else -1) for t, i in vocabulary.items()}
    size = len(vocabulary)
    pad = spec.get("pad_to_multiple_of")
    if pad and size % pad:
        size = (size // pad + 1) * pad
    shape = tensors[models[0]].shape[1:]
    configs = dict(spec.get("tokens") or {})
    average = set()
    for token, token_id in vocabulary.items():
        if token in configs:
            continue
        has = [permutations[m][token_id] >= 0 for m in models]
        if sum(has) == 1:
            configs[token] = {"source": models[has.index(True)]}
        elif sum(has) == 0:
            configs[token] = {"source": "zero"}
        elif "base" in models and permutations["base"][token_id] >= 0:
            configs[token] = {"source": "base"}
        else:
            average.add(token)
    defaults = {}
    for token, token_id in vocabulary.items():
        config = configs.get(token)
        if not (config and config.get("force")) and all(permutations[m][token_id] >= 0 for m in models):
            continue
        if token in average:
            embed, count = torch.zeros(shape), 0
            for m in models:
                if permutations[m][token_id] >= 0:
                    embed = embed + tensors[m][permutations[m][token_id]].float()
                    count += 1
            defaults[token] = embed / count
        elif config is not None:
            source = config["source"]
            if source == "zero":
                defaults[token] = torch.zeros(shape)
            elif isinstance(source, dict):
                row = source.get("token_id", originals[source["model"]].get(source.get("token")))
                defaults[token] = tensors[source["model"]][row].float()
            else:
                defaults[token] = tensors[source][permutations[source][token_id]].float()
    out = {}
    for m in models:
        new = torch.zeros((size, *shape))
        for token, token_id in vocabulary.items():
            force = bool(configs.get(token, {}).get("force"))
            if permutations[m][token_id] >= 0 and not force:
                new[token_id] = tensors[m][permutations[m][token_id]].float()
            elif token in defaults:
                new[token_id] = defaults[token]
        if size > len(vocabulary):
            new[len(vocabulary):] = torch.mean(new[: len(vocabulary)], dim=0)
        out[m] = new
    return out
