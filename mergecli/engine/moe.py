"""A mixture of experts from dense models, as mergekit-moe 0.1.5 builds it, streamed tensor by tensor.

The layout (mergekit's `moe/mixtral.py`, `moe/qwen.py`): attention, norms, embeddings and the
output layer come from the base; expert e of layer l is the MLP of layer l of the e-th expert
model, its down_proj (the MLP's output) multiplied by the expert's `residual_scale` if it has one.
- Mixtral (llama or mistral inputs): `block_sparse_moe.experts.{e}.w1/w2/w3` from each expert's
  `mlp.gate_proj/down_proj/up_proj`, and the router `block_sparse_moe.gate.weight` (experts x
  hidden), the names transformers saves (mergekit 0.1.5 writes transformers 5's fused
  `mlp.experts.gate_up_proj` / `down_proj` and `mlp.gate.weight`, which transformers 4 cannot
  load; both load as the same model in transformers 5).
- Qwen2-MoE (one shared expert): `mlp.experts.{e}.*_proj`, the shared expert's MLP as
  `mlp.shared_expert.*_proj`, the routers `mlp.gate.weight` and `mlp.shared_expert_gate.weight`
  (1 x hidden); q/k/v biases that the base lacks are zeros (Qwen2-MoE's attention has them).
config.json is made by transformers' own config classes as mergekit makes it (`output_config`).

The routers (mergekit's `moe/router.py`), row g of layer l for gated expert g:
- hidden (= hidden_last) / hidden_avg: the prompts, tokenized with the base's tokenizer as mergekit
  does (the BOS text prepended, no other special tokens, padded on the left with BOS), run through
  the base; at each decoder block, the block's input hidden state at the last position (hidden_avg:
  the mean over every position, padding included), averaged over the prompts: p_l for the positive
  prompts, n_l for the negative ones; row = (p_l - n_l) / max(|p_l - n_l|, 1e-8) (without negative
  prompts, p_l normalized). The base runs block by block (`streamed.StreamedModel`), a forward
  pre-hook on each materialized block reading its input, in fp32 (mergekit runs the model in
  bfloat16: its routers differ by bfloat16 rounding).
- cheap_embed: e = the sum of the token embeddings over every prompt's non-pad tokens,
  normalized; row = normalize(e_pos - e_neg), the same at every layer.
- random: a standard normal draw of shape (layers, gated experts, hidden) from a generator seeded
  with `seed` (mergekit draws the same numbers from its global generator after
  `--random-seed seed`); uniform_random: U(-s, s) with s = sqrt(1 / hidden), drawn as
  rand * 2s - s. Neither is normalized.

Memory: one tensor at a time while writing (read, scaled, cast, appended to its shard), and for
hidden gates the base run block by block on the prompts.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from ..errors import MergeCliError, ModelMismatchError
from ..models.architecture import LEGACY_BUFFER
from ..models.loading import load_tokenizer
from ..models.safetensors_io import Checkpoint, ShardedWriter, TensorInfo
from ..progress import SILENT, Reporter
from ..recipe.moe import INPUT_TYPES, MIXTRAL, QWEN2_MOE, RANDOM_MODES, MoEConfig
from .streamed import StreamedModel, Weights
from .writer import TOKENIZER_FILES

MLP = ("gate_proj", "up_proj", "down_proj")
MIXTRAL_NAMES = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
# the base's tensors of each layer that each output keeps (mergekit's architecture definitions)
ATTENTION = ("input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
             "self_attn.v_proj.weight", "self_attn.o_proj.weight", "post_attention_layernorm.weight")
BIASES = ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias")
EMBEDDING, NORM, OUTPUT = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"


# -- the routers ---------------------------------------------------------------------------------

def normalized(v: torch.Tensor) -> torch.Tensor:
    """v / max(|v|, 1e-8) along the last dimension (mergekit's clamp)."""
    return v / v.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)


def gate_row(positive: torch.Tensor, negative: torch.Tensor | None) -> torch.Tensor:
    """A gated expert's router rows from its prompts' vectors (layers x hidden, or hidden)."""
    return normalized(positive - negative if negative is not None else positive)


def random_gates(mode: str, shape: tuple[int, int, int], seed: int) -> torch.Tensor:
    """(layers, gated experts, hidden) drawn as mergekit draws them right after `set_seed(seed)`."""
    generator = torch.Generator().manual_seed(seed)
    if mode == "random":
        return torch.randn(shape, generator=generator)
    scale = math.sqrt(1.0 / shape[2])
    return torch.rand(shape, generator=generator) * 2 * scale - scale


def tokenized(tokenizer: Any, prompts: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, attention mask) of one prompt list as one batch, as mergekit tokenizes it."""
    batch = tokenizer([(tokenizer.bos_token or "") + p for p in prompts], return_tensors="pt", padding=True,
                      add_special_tokens=False)
    return batch["input_ids"], batch["attention_mask"]


def prepare_tokenizer(tokenizer: Any) -> Any:
    """mergekit's settings: padding on the left, with BOS (EOS where there is no BOS)."""
    tokenizer.padding_side = "left"
    tokenizer.pad_token_id = tokenizer.bos_token_id
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.pad_token_id is None:
        raise MergeCliError("base_model: its tokenizer has neither a BOS nor an EOS token to pad prompts with")
    return tokenizer


def embedding_vector(embed: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """cheap_embed: the normalized sum of the embeddings of every non-pad token of a batch (hidden)."""
    h = embed.float()[ids]  # what mergekit's one_hot(ids) @ embed gives, exactly
    total = (h * mask.unsqueeze(-1)).sum(dim=1).sum(dim=0)
    return normalized(total)


def hidden_vectors(runner: StreamedModel, weights: Weights, batches: list[tuple[torch.Tensor, torch.Tensor]],
                   last: bool, advance: Callable[[int], None] = lambda n: None) -> torch.Tensor:
    """(batches, layers, hidden), fp32: for each batch and decoder block, the block's input hidden
    state at the last position (`last`) or averaged over every position, then averaged over the
    batch's prompts. A forward pre-hook on each block as it is materialized by the block-streamed
    runner reads the input (the hook point the Hessian collection uses)."""
    hidden = runner.model.config.hidden_size
    found = torch.zeros(len(batches), len(runner.layers), hidden, dtype=torch.float32)
    current = [0]

    def on_block(index: int, block: torch.nn.Module, masks: Iterator[torch.Tensor]) -> None:
        def read(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            states = (args[0] if args else kwargs["hidden_states"]).float()
            states = states[:, -1, :] if last else states.sum(dim=1) / states.shape[1]
            found[current[0], index] = (states.sum(dim=0) / states.shape[0]).cpu()

        handle = block.register_forward_pre_hook(read, with_kwargs=True)
        try:
            for current[0], _ in enumerate(masks):
                pass
        finally:
            handle.remove()
        advance(1)

    runner.hidden_states(weights, batches, on_block)
    return found


def routers(config: MoEConfig, base: Path, layers: int, hidden: int, seed: int, device: torch.device,
            reporter: Reporter = SILENT) -> torch.Tensor:
    """(layers, gated experts, hidden) fp32: every router row (see the module's doc)."""
    gated = config.gated
    mode = config.gate_mode
    if mode in RANDOM_MODES:
        return random_gates(mode, (layers, len(gated), hidden), seed)
    tokenizer = prepare_tokenizer(load_tokenizer(base))
    lists = [(g, sign, prompts) for g, e in enumerate(gated)
             for sign, prompts in ((1, e.positive_prompts), (-1, e.negative_prompts)) if prompts]
    batches = [tokenized(tokenizer, prompts) for _, _, prompts in lists]
    checkpoint = Checkpoint.open(base)
    if mode == "cheap_embed":
        if EMBEDDING not in checkpoint:
            raise ModelMismatchError(f"base_model: no tensor {EMBEDDING} for gate_mode cheap_embed")
        embed = checkpoint.get(EMBEDDING)
        for ids, _ in batches:
            if int(ids.max()) >= embed.shape[0]:
                raise ModelMismatchError(f"base_model: its tokenizer gives token id {int(ids.max())}, beyond its "
                                         f"{embed.shape[0]} embedding rows")
        vectors = torch.stack([embedding_vector(embed, ids, mask) for ids, mask in batches])[:, None, :]
        vectors = vectors.expand(len(batches), layers, hidden)
    else:
        runner = StreamedModel.from_folder(base, device=device, dtype=torch.float32)
        weights = runner.checkpoint_weights(checkpoint)
        with reporter.track(f"moe: hidden states of {sum(len(p) for _, _, p in lists)} prompts", layers) as advance:
            vectors = hidden_vectors(runner, weights, batches, last=mode != "hidden_avg", advance=advance)
    rows = []
    for g in range(len(gated)):
        positive = next(v for (i, sign, _), v in zip(lists, vectors) if i == g and sign > 0)
        negative = next((v for (i, sign, _), v in zip(lists, vectors) if i == g and sign < 0), None)
        rows.append(gate_row(positive, negative))
    return torch.stack(rows, dim=1)  # layers x gated x hidden


# -- the output's config and tensors ------------------------------------------------------------

def torch_dtype(name: Any) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    return getattr(torch, str(name).removeprefix("torch."))


def output_config(base_config: Any, output: str, experts: int, per_token: int, dtype: torch.dtype | None) -> Any:
    """The output's transformers config, made as mergekit 0.1.5 makes it from the base's."""
    import transformers

    if output == MIXTRAL:
        if not isinstance(base_config, transformers.MistralConfig):
            mistral = transformers.MistralConfig(**base_config.to_dict())
            mistral.sliding_window = None
            mistral.max_position_embeddings = base_config.max_position_embeddings
            base_config = mistral
        config = transformers.MixtralConfig(**base_config.to_dict())
        config.architectures = ["MixtralForCausalLM"]
        config.num_local_experts = experts
        config.num_experts_per_tok = per_token
        config.sliding_window = None
    else:
        config = transformers.Qwen2MoeConfig(**base_config.to_dict())
        config.architectures = ["Qwen2MoeForCausalLM"]
        config.num_experts = experts
        config.num_experts_per_tok = per_token
        config.decoder_sparse_step = 1
        config.norm_topk_prob = True
        config.sliding_window = None
        config.use_sliding_window = False
        config.shared_expert_intermediate_size = config.intermediate_size
        config.moe_intermediate_size = config.intermediate_size
    if dtype is not None:
        config.dtype = dtype
    return config


@dataclass(frozen=True)
class Planned:
    """One output tensor: where its values come from."""

    info: TensorInfo
    model: int | None = None  # 0 the base, 1.. the experts, then the shared expert; None: a router or zeros
    stored: str | None = None  # its name in that model's files
    scale: float | None = None  # residual_scale (down_proj)
    layer: int | None = None
    router: str | None = None  # "experts" or "shared" (the rows of layer `layer`); None with no model: zeros


@dataclass(frozen=True)
class Layout:
    output: str
    config: Any  # the transformers config written as config.json
    tensors: list[Planned]
    gated: int  # router rows per layer


def plan_layout(config: MoEConfig, checkpoints: list[Checkpoint], base_config: Any,
                model_types: list[str]) -> Layout:
    """Every output tensor, checked against the inputs (one error naming the key otherwise)."""
    keys = [key for key, _ in config.models()]
    allowed = INPUT_TYPES[config.output]
    for key, kind in zip(keys, model_types):
        if kind != model_types[0]:
            raise ModelMismatchError(f"{key}: model_type {kind!r}, the base's is {model_types[0]!r}; mergekit "
                                     "builds a mixture only from models of one architecture")
    if model_types[0] not in allowed:
        raise ModelMismatchError(f"base_model: model_type {model_types[0]!r}; a {config.output} mixture is built from "
                                 f"{' or '.join(allowed)} models")
    base = checkpoints[0]
    layers = base_config.num_hidden_layers
    out_dtype = torch_dtype(config.dtype) or torch_dtype(getattr(base_config, "dtype", None))
    out = output_config(base_config, config.output, len(config.experts), config.experts_per_token, out_dtype)

    def copied(name: str, model: int = 0, stored: str | None = None, scale: float | None = None,
               layer: int | None = None) -> Planned:
        stored = stored or name
        ckpt = checkpoints[model]
        if stored not in ckpt:
            raise ModelMismatchError(f"{keys[model]}: no tensor {stored}")
        info = ckpt.info(stored)
        if model:
            expected = base.info(stored).shape if stored in base else None
            if info.shape != expected:
                raise ModelMismatchError(f"{keys[model]}: {stored} is {info.shape}, the base's is {expected}; "
                                         "an expert must have the base's shapes")
        return Planned(TensorInfo(name, info.shape, out_dtype or info.dtype), model, stored, scale, layer)

    # without a dtype anywhere, every tensor keeps its stored dtype and the routers take the embedding's
    router_dtype = out_dtype or (base.info(EMBEDDING).dtype if EMBEDDING in base else torch.float32)
    hidden = base_config.hidden_size
    experts = list(enumerate(config.experts, start=1))
    shared_index = len(config.experts) + 1
    planned = [copied(EMBEDDING)]
    for layer in range(layers):
        prefix = f"model.layers.{layer}"
        planned += [copied(f"{prefix}.{t}", layer=layer) for t in ATTENTION]
        if config.output == QWEN2_MOE:
            heads = {"q": out.num_attention_heads, "k": out.num_key_value_heads, "v": out.num_key_value_heads}
            for bias in BIASES:
                name = f"{prefix}.{bias}"
                if name in base:
                    planned.append(copied(name, layer=layer))
                else:  # Qwen2-MoE's attention has biases: zeros, as mergekit writes them
                    rows = heads[bias.split(".")[1][0]] * (out.hidden_size // out.num_attention_heads)
                    planned.append(Planned(TensorInfo(name, (rows,), out_dtype or torch.float32), layer=layer))
        for e, expert in experts:
            for part in MLP:
                stored = f"{prefix}.mlp.{part}.weight"
                name = (f"{prefix}.block_sparse_moe.experts.{e - 1}.{MIXTRAL_NAMES[part]}.weight"
                        if config.output == MIXTRAL else f"{prefix}.mlp.experts.{e - 1}.{part}.weight")
                planned.append(copied(name, e, stored, expert.residual_scale if part == "down_proj" else None, layer))
        if config.output == QWEN2_MOE:
            shared = config.shared_experts[0]
            for part in MLP:
                stored = f"{prefix}.mlp.{part}.weight"
                planned.append(copied(f"{prefix}.mlp.shared_expert.{part}.weight", shared_index, stored,
                                      shared.residual_scale if part == "down_proj" else None, layer))
            gate = f"{prefix}.mlp.gate.weight"
        else:
            gate = f"{prefix}.block_sparse_moe.gate.weight"
        planned.append(Planned(TensorInfo(gate, (len(config.experts), hidden), router_dtype), layer=layer,
                               router="experts"))
        if config.output == QWEN2_MOE:
            planned.append(Planned(TensorInfo(f"{prefix}.mlp.shared_expert_gate.weight", (1, hidden), router_dtype),
                                   layer=layer, router="shared"))
    planned.append(copied(NORM))
    if OUTPUT in base:
        planned.append(copied(OUTPUT))
    elif not getattr(base_config, "tie_word_embeddings", False):
        raise ModelMismatchError(f"base_model: no tensor {OUTPUT}, and its embeddings are not tied")
    used = {p.stored for p in planned if p.model == 0} | {f"model.layers.{i}.mlp.{p}.weight"
                                                          for i in range(layers) for p in MLP}
    left = [n for n in base.names() if n not in used and not LEGACY_BUFFER.search(n)]
    if left:
        raise ModelMismatchError(f"base_model: {left[0]} has no place in a {config.output} model"
                                 + (f" (and {len(left) - 1} more)" if len(left) > 1 else ""),
                                 "mergekit would drop it silently; mergecli accounts for every tensor")
    return Layout(config.output, out, planned, len(config.gated))


@dataclass(frozen=True)
class Built:
    output: str
    tensors: int
    files: list[str]
    seconds: float


def build_moe(folder: Path, config: MoEConfig, sources: list[Path], seed: int, device: torch.device,
              shard_bytes: int, reporter: Reporter = SILENT) -> Built:
    """Write the mixture into `folder`: config.json, the weights tensor by tensor, the base's
    generation config and tokenizer files. `sources`: the model folders, as `config.models()`."""
    from transformers import AutoConfig

    start = time.perf_counter()
    configs = []
    for (key, _), folder_in in zip(config.models(), sources):
        try:
            configs.append(AutoConfig.from_pretrained(folder_in, trust_remote_code=False))
        except Exception as exc:  # noqa: BLE001 - transformers raises many kinds on a bad config
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise MergeCliError(f"{key}: cannot read {folder_in / 'config.json'} ({reason})") from None
    checkpoints = [Checkpoint.open(path) for path in sources]
    layout = plan_layout(config, checkpoints, configs[0], [c.model_type for c in configs])
    base_config = configs[0]
    gates = routers(config, sources[0], base_config.num_hidden_layers, base_config.hidden_size, seed, device, reporter)
    experts = len(config.experts)
    layout.config.save_pretrained(folder)
    infos = [p.info for p in layout.tensors]
    writer = ShardedWriter(folder, infos, shard_bytes)
    with writer, reporter.track("moe: writing", len(infos)) as advance:
        for planned in layout.tensors:
            writer.write(planned.info.name, _value(planned, checkpoints, gates, experts))
            advance(1)
    for name in ("generation_config.json", *TOKENIZER_FILES):
        if (sources[0] / name).is_file():
            shutil.copyfile(sources[0] / name, folder / name)
    return Built(layout.output, len(infos), writer.all_files, round(time.perf_counter() - start, 3))


def _value(planned: Planned, checkpoints: list[Checkpoint], gates: torch.Tensor, experts: int) -> torch.Tensor:
    info = planned.info
    if planned.model is not None:
        tensor = checkpoints[planned.model].get(planned.stored)
        if planned.scale is not None:  # in the stored dtype, then cast, as mergekit does
            tensor = tensor * planned.scale
        return tensor.to(info.dtype)
    if planned.router == "experts":
        return gates[planned.layer, :experts].to(info.dtype).contiguous()
    if planned.router == "shared":
        return gates[planned.layer, experts:experts + 1].to(info.dtype).contiguous()
    return torch.zeros(info.shape, dtype=info.dtype)
