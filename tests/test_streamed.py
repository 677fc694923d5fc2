"""The block-streamed runner (`mergecli.engine.streamed`) against the whole model loaded by transformers:
the same NLL per window, the same gradient of every weight, the same per-layer statistics, and
never more than one decoder block's weights materialized, whatever the depth."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import TINY_CONFIGS

from mergecli.engine.calibration import Windows
from mergecli.errors import MergeCliError
from mergecli.models.safetensors_io import Checkpoint
from mergecli.engine.perplexity import window_nlls
from mergecli.engine.streamed import StreamedModel, mean_of, window_means

# every tested architecture, and Qwen2 with a full-attention and a sliding-window layer (each layer
# gets its own mask: reusing layer 0's arguments for layer 1 changes the NLL by 3% here)
CASES = {**{t: (t, {}) for t in TINY_CONFIGS},
         "qwen2-sliding": ("qwen2", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1})}
CPU = torch.device("cpu")


def build(folder: Path, case: str, **extra) -> torch.nn.Module:
    """A tiny random model of `case` saved to `folder`, and read back as `load_causal_lm` reads it
    (fp32). Weights at std 0.2, not 0.02: with near-zero weights every architecture predicts nearly
    the uniform distribution, and a wrong mask or position would hide below the tolerance."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, overrides = CASES[case]
    config = AutoConfig.for_model(model_type, **{**TINY_CONFIGS[model_type], **overrides, **extra},
                                  initializer_range=0.2)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """case -> (folder, loaded model), each built once."""
    cache: dict[str, tuple[Path, torch.nn.Module]] = {}

    def get(case: str):
        if case not in cache:
            folder = tmp_path_factory.mktemp(case)
            cache[case] = (folder, build(folder, case))
        return cache[case]
    return get


def windows(samples: int = 5, seq_len: int = 16, seed: int = 0) -> Windows:
    """Random tokens, two windows right-padded as `make_windows(pack=False)` pads them."""
    ids = torch.randint(4, 96, (samples, seq_len), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0
    mask[3, 6:] = 0
    return Windows(ids, mask)


def relative(found: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference over the largest magnitude of the expected tensor."""
    return float((found - expected).abs().max() / expected.abs().max().clamp(min=1e-30))


@pytest.mark.parametrize("case", list(CASES))
def test_window_nlls_match_the_loaded_model(built, case):
    folder, loaded = built(case)
    runner = StreamedModel.from_folder(folder)
    with Checkpoint.open(folder) as checkpoint:
        found = runner.window_nlls(runner.checkpoint_weights(checkpoint), windows(), batch_size=2)
    expected = window_nlls(loaded, windows(), 2, CPU)
    assert [n for _, n in found] == [n for _, n in expected]
    assert max(abs(f - e) / abs(e) for (f, _), (e, _) in zip(found, expected)) <= 1e-5
    # buffers (rotary tables) are not in the checkpoint: set as from_pretrained sets them
    for name, buffer in loaded.named_buffers():
        assert torch.equal(runner.model.get_buffer(name), buffer), name


@pytest.mark.parametrize("case", list(CASES))
def test_gradients_match_autograd_on_the_loaded_model(built, case):
    folder, loaded = built(case)
    runner = StreamedModel.from_folder(folder)
    batches = list(windows().batches(2))
    delivered: dict[str, torch.Tensor] = {}

    def on_grad(name: str, grad: torch.Tensor) -> None:
        assert name not in delivered, f"{name} delivered twice"
        delivered[name] = grad.clone()

    with Checkpoint.open(folder) as checkpoint:
        value = runner.gradients(runner.checkpoint_weights(checkpoint), batches, on_grad)
    loaded.zero_grad()
    expected = mean_of([window_means(loaded(input_ids=ids, attention_mask=mask, use_cache=False).logits, ids, mask)
                        for ids, mask in batches])
    expected.backward()
    params = dict(loaded.named_parameters())  # a tied pair once, as the runner delivers it
    assert set(delivered) == set(params)
    assert value == pytest.approx(expected.item(), rel=1e-6)
    for name, param in params.items():
        assert relative(delivered[name], param.grad) <= 1e-5, name


def test_a_non_separable_loss_and_the_gradient_of_scales(built):
    """`lambda: learned`'s use: weights theta(s) = base + sum_i s_(group, i) part_i assembled in the
    callback, the gradient of each scale reduced from each weight's gradient as it is delivered
    (<dL/dW, part_i>), against autograd through s on the whole model; the loss couples batches."""
    from torch.func import functional_call

    folder, loaded = built("llama")
    runner = StreamedModel.from_folder(folder)
    base = {n: p.detach() for n, p in loaded.named_parameters()}
    generator = torch.Generator().manual_seed(1)
    parts = [{n: 0.05 * torch.randn(p.shape, generator=generator) for n, p in base.items()} for _ in range(2)]
    group = {n: int(n.split(".")[2]) + 1 if n.startswith("model.layers.") else 0 for n in base}  # outer: 0
    scales = torch.tensor([[0.7, 1.3]] * 3) + 0.1 * torch.arange(3)[:, None]

    def theta(s: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: base[n] + s[group[n], 0] * parts[0][n] + s[group[n], 1] * parts[1][n] for n in base}

    def loss(values: list[torch.Tensor]) -> torch.Tensor:
        return values[0].mean() * values[1].mean() + (values[1] - 4.0).clamp(min=0).mean()

    batches = list(windows(4).batches(2))
    found = torch.zeros_like(scales)

    def on_grad(name: str, grad: torch.Tensor) -> None:
        for i in range(2):
            found[group[name], i] += (grad * parts[i][name]).sum()

    current = theta(scales)
    value = runner.gradients(lambda names: {n: current[n] for n in names}, batches, on_grad, loss=loss)
    s = scales.clone().requires_grad_()
    weights = theta(s)
    expected = loss([window_means(functional_call(loaded, weights, (), {"input_ids": ids, "attention_mask": mask,
                                                                        "use_cache": False}).logits, ids, mask)
                     for ids, mask in batches])
    expected.backward()
    assert value == pytest.approx(expected.item(), rel=1e-6)
    assert relative(found, s.grad) <= 1e-5


@pytest.mark.parametrize("case", ["llama", "gpt2"])
def test_block_hook_collects_what_hooks_on_the_loaded_model_collect(built, case):
    """The Hessian stage's statistic, H = sum over non-pad tokens of x^T x of layer 1's attention
    input, collected on the materialized block (padding excluded with the mask of the batch that
    runs), without the model loaded."""
    folder, loaded = built(case)
    runner = StreamedModel.from_folder(folder)
    module = {"llama": "self_attn.q_proj", "gpt2": "attn.c_attn"}[case]
    batches = list(windows().batches(2))

    def gram(sums: dict, mask: dict):
        def hook(_module, args):
            x = args[0].reshape(-1, args[0].shape[-1])[mask["now"].reshape(-1).bool()]
            sums["H"] = sums.get("H", 0) + x.T @ x
            sums["n"] = sums.get("n", 0) + x.shape[0]
        return hook

    found, current = {}, {}

    def on_block(index, block, masks):
        if index != 1:
            return
        handle = block.get_submodule(module).register_forward_pre_hook(gram(found, current))
        try:
            for mask in masks:
                current["now"] = mask
        finally:
            handle.remove()

    with Checkpoint.open(folder) as checkpoint:
        runner.hidden_states(runner.checkpoint_weights(checkpoint), batches, on_block)
    expected, now = {}, {}
    handle = loaded.get_submodule(f"{runner.stack}.1.{module}").register_forward_pre_hook(gram(expected, now))
    with torch.no_grad():
        for ids, mask in batches:
            now["now"] = mask
            loaded(input_ids=ids, attention_mask=mask, use_cache=False)
    handle.remove()
    assert found["n"] == expected["n"] == int(windows().attention_mask.sum())
    assert relative(found["H"], expected["H"]) <= 1e-5


def materialized(module: torch.nn.Module) -> int:
    """Parameters of the module (each once) that are not on the meta device."""
    return sum(p.numel() for p in module.parameters() if p.device.type != "meta")


@pytest.mark.parametrize("case", ["llama", "bloom"])
def test_one_block_of_weights_at_a_time_whatever_the_depth(tmp_path, case):
    """At 2 and 8 layers: whenever the runner fetches weights no block is materialized, whenever a
    block runs or a gradient is delivered at most one is, each block is fetched once per forward
    (twice with gradients), and the most parameters ever held is the same: outer + one block."""
    peaks = {}
    for layers in (2, 8):
        key = "n_layer" if case == "bloom" else "num_hidden_layers"
        loaded = build(tmp_path / f"{layers}", case, **{key: layers})
        state = {n: p.detach() for n, p in loaded.named_parameters()}
        runner = StreamedModel(loaded.config)
        one_block = sum(p.numel() for p in loaded.get_submodule(f"{runner.stack}.0").parameters())
        outer = sum(p.numel() for n, p in loaded.named_parameters() if not n.startswith(runner.stack + "."))
        seen = {"fetches": 0, "blocks": 0, "total": 0}

        def look(expect_blocks: int) -> None:
            blocks = [materialized(layer) for layer in runner.layers]
            assert sum(b > 0 for b in blocks) <= expect_blocks
            seen["blocks"] = max(seen["blocks"], sum(blocks))
            seen["total"] = max(seen["total"], materialized(runner.model))

        def weights(names: list[str]) -> dict[str, torch.Tensor]:
            look(0)
            seen["fetches"] += 1
            return {n: state[n] for n in names}

        for layer in runner.layers:
            layer.register_forward_pre_hook(lambda *_: look(1))
        runner.window_nlls(weights, windows(), batch_size=2)
        assert seen["fetches"] == layers + 1
        runner.gradients(weights, list(windows().batches(2)), lambda name, grad: look(1))
        assert seen["fetches"] == (layers + 1) + (2 * layers + 1)
        assert seen["blocks"] == one_block
        assert seen["total"] == outer + one_block
        assert materialized(runner.model) == 0  # nothing left behind
        peaks[layers] = seen["total"]
    assert peaks[2] == peaks[8]


def test_checkpoint_names_are_mapped_by_transformers_rules(built, tmp_path):
    """A GPT-2 checkpoint with the legacy names of the hub's gpt2 (`h.0...`, no `transformer.`), a
    GPT-NeoX one whose output layer is stored as `embed_out`: both run as the loaded model; a
    tensor the weights lack is an error naming it."""
    from safetensors.torch import save_file

    folder, loaded = built("gpt2")
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text((folder / "config.json").read_text())
    with Checkpoint.open(folder) as checkpoint:
        save_file({n.removeprefix("transformer."): checkpoint.get(n) for n in checkpoint.names()},
                  str(legacy / "model.safetensors"))
    runner = StreamedModel.from_folder(legacy)
    with Checkpoint.open(legacy) as checkpoint:
        assert "h.0.attn.c_attn.weight" in checkpoint
        found = runner.window_nlls(runner.checkpoint_weights(checkpoint), windows(), 2)
    assert found == pytest.approx(window_nlls(loaded, windows(), 2, CPU), rel=1e-5)

    folder, loaded = built("gpt_neox")
    runner = StreamedModel.from_folder(folder)
    with Checkpoint.open(folder) as checkpoint:
        assert "embed_out.weight" in checkpoint and "lm_head.weight" in runner.outer
        found = runner.window_nlls(runner.checkpoint_weights(checkpoint), windows(), 2)
    assert found == pytest.approx(window_nlls(loaded, windows(), 2, CPU), rel=1e-5)

    state = dict(loaded.named_parameters())
    with pytest.raises(MergeCliError, match="lack gpt_neox.layers.1.mlp.dense_h_to_4h.weight"):
        runner.window_nlls(lambda names: {n: state[n] for n in names if "1.mlp.dense_h_to_4h.w" not in n},
                           windows(), 2)
    assert materialized(runner.model) == 0
