"""Collect H = sum over non-pad tokens of x x^T for every linear layer's input, with forward hooks.

Activations are never stored: each hook adds x^T x of its input to an fp32 sum in place (`addmm_`,
no d x d temporary). H is symmetric, so only row blocks from the diagonal rightwards are
computed (up to 8 blocks of at least 128 columns: 56% of the products for wide inputs) and the
lower triangle is filled once at the end. Without that, X^T X would cost about as many
multiply-adds as the layers' own forward.
Layers that read the same input tensor (q/k/v, gate/up, BLOOM's fused qkv trivially) form one
group and share one H; groups are detected by tensor identity on a probe forward, not by name
lists, so any architecture works. The output embedding (lm_head) is not collected: it is tied to
the input embedding in most models, and tensors without statistics fall back to magnitude.

Two runners give the same H: `whole` runs the full model per batch; `layer_by_layer` keeps one
decoder block on the device at a time, passing each batch's hidden states from block to block,
like SparseGPT's sequential runner, for models larger than the device; a block's finished H goes
back to the host with it (Llama-2-7B: 0.64 GiB per block, 20.45 GiB for all 32).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .calibration import Windows
from ..models.architecture import decoder_layers


def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Linear / Conv1D layers whose inputs get statistics (all but the output embedding)."""
    from transformers.pytorch_utils import Conv1D

    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name: m for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, Conv1D)) and m is not output}


@dataclass
class Statistics:
    """Per group: the summed H (fp32) and its token count; members maps weight name -> group."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    members: dict[str, str] = field(default_factory=dict)


class _Stop(Exception):
    pass


def find_groups(model: nn.Module, input_ids: torch.Tensor) -> dict[str, list[str]]:
    """leader module name -> modules that receive the very same input tensor in a forward pass.

    Every input is kept alive until the pass ends, so two tensors can never share an address.
    """
    modules = linear_modules(model)
    seen: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: seen.__setitem__(name, args[0]))
             for name, m in modules.items()]
    try:
        with torch.no_grad():
            model(input_ids=input_ids[:1, :8], use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    groups: dict[str, list[str]] = {}
    leader_of: dict[tuple, str] = {}
    for name in modules:
        x = seen.get(name)
        if x is None:
            continue
        key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()))
        leader = leader_of.setdefault(key, name)
        groups.setdefault(leader, []).append(name)
    return groups


def collect(model: nn.Module, windows: Windows, groups: dict[str, list[str]], batch_size: int,
            device: torch.device, layer_by_layer: bool = False,
            advance: Callable[[int], None] = lambda n: None) -> Statistics:
    """Run the calibration windows through the model and return the summed statistics."""
    modules = linear_modules(model)
    stats = Statistics()
    current: dict[str, torch.Tensor] = {}

    def accumulate(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].reshape(-1, args[0].shape[-1])
            if not current["packed"]:
                x = x[current["mask"].reshape(-1).bool()]
            x = x.float()
            if name not in stats.sums:
                stats.sums[name] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
            add_upper_gram(stats.sums[name], x)
            stats.counts[name] = stats.counts.get(name, 0) + x.shape[0]
        return hook

    finished: set[str] = set()

    def finish() -> None:
        """Mirror the sums not yet finished and move them off the device; layer by layer this runs
        after each block, so the device holds one block's H at a time, not the whole model's."""
        for name, h in stats.sums.items():
            if name not in finished:
                stats.sums[name] = symmetrize(h).cpu()
                finished.add(name)

    for leader, members in groups.items():
        for member in members:
            stats.members[f"{member}.weight"] = leader
    hooks = [modules[leader].register_forward_pre_hook(accumulate(leader)) for leader in groups]
    try:
        with torch.no_grad():
            if layer_by_layer:
                _run_layer_by_layer(model, windows, batch_size, device, current, advance, finish)
            else:
                model.to(device)
                backbone = getattr(model, "base_model", model)  # no logits: the output layer is not collected
                for ids, mask in windows.batches(batch_size):
                    _set_mask(current, mask.to(device))
                    backbone(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
                    advance(ids.shape[0])
    finally:
        for hook in hooks:
            hook.remove()
    finish()
    return stats


def _row_blocks(d: int, blocks: int = 8) -> range:
    return range(0, d, max(128, -(-d // blocks)))


def add_upper_gram(h: torch.Tensor, x: torch.Tensor) -> None:
    """h[i, j] += (x^T x)[i, j] for every j at or right of i's diagonal block: one in-place matmul
    per row block (a single one for small d)."""
    blocks = _row_blocks(x.shape[1])
    for start in blocks:
        h[start:start + blocks.step, start:].addmm_(x[:, start:start + blocks.step].T, x[:, start:])


def symmetrize(h: torch.Tensor) -> torch.Tensor:
    """Fill everything below the diagonal from its mirror image, in place (exactly symmetric)."""
    blocks = _row_blocks(h.shape[0])
    for start in blocks:
        end = start + blocks.step
        h[end:, start:end] = h[start:end, end:].T
        diagonal = h[start:end, start:end]
        diagonal.copy_(torch.triu(diagonal) + torch.triu(diagonal, 1).T)
    return h


def _set_mask(current: dict, mask: torch.Tensor) -> None:
    """The batch's attention mask; packed batches (no padding) skip the per-hook token selection."""
    current["mask"] = mask
    current["packed"] = bool(mask.all())


def _run_layer_by_layer(model: nn.Module, windows: Windows, batch_size: int, device: torch.device,
                        current: dict[str, torch.Tensor], advance: Callable[[int], None],
                        finish: Callable[[], None]) -> None:
    """Progress counts windows once per block (windows x blocks in all)."""
    layers = decoder_layers(model)
    model.to("cpu")
    inputs: list[tuple[tuple, dict, torch.Tensor]] = []

    def capture(module: nn.Module, args: tuple, kwargs: dict) -> None:
        inputs.append((args, kwargs, current["mask"]))
        raise _Stop

    # everything outside the block stack (embeddings, rotary tables) runs on the device
    _move_except(model, layers, device)
    hook = layers[0].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        for ids, mask in windows.batches(batch_size):
            _set_mask(current, mask.to(device))
            try:
                model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        hook.remove()
    for layer in layers:
        layer.to(device)
        for i, (args, kwargs, mask) in enumerate(inputs):
            _set_mask(current, mask)
            out = layer(*args, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
            inputs[i] = ((hidden, *args[1:]), kwargs, mask)
            advance(hidden.shape[0])
        layer.to("cpu")
        finish()
    model.to("cpu")


def _move_except(model: nn.Module, keep: nn.Module, device: torch.device) -> None:
    """Move every parameter and buffer to `device` except those inside `keep`."""
    kept = {id(p) for p in keep.parameters()} | {id(b) for b in keep.buffers()}
    for module in model.modules():
        for _, param in list(module.named_parameters(recurse=False)):
            if id(param) not in kept:
                param.data = param.data.to(device)
        for name, buf in list(module.named_buffers(recurse=False)):
            if id(buf) not in kept:
                module._buffers[name] = buf.to(device)
