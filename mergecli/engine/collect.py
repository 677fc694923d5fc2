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

Two runners give the same H: `collect` runs the loaded model per batch; `collect_blocks` never
loads it: the block-streamed runner (`streamed.py`) materializes one decoder block at a time,
every batch runs through it while its hooks accumulate, and each block's finished H is handed
on (`finished`: written to disk at once) before the next block's weights are read, so memory
holds the modules outside the stack, one block, its H and the hidden states at block
boundaries, whatever the depth (Llama-2-7B: 0.64 GiB of H per block). It collects the decoder
blocks' linear layers (every tested architecture has none outside the stack but the output one).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from .calibration import Windows
from .streamed import StreamedModel, Weights


def is_linear(module: nn.Module) -> bool:
    """An nn.Linear or a GPT-2 Conv1D: a layer whose input gets statistics."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D))


def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Linear / Conv1D layers whose inputs get statistics (all but the output embedding)."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name: m for name, m in model.named_modules() if is_linear(m) and m is not output}


def in_features(module: nn.Module) -> int:
    return module.in_features if hasattr(module, "in_features") else module.weight.shape[0]  # Conv1D: in x out


@dataclass
class Statistics:
    """Per group: the summed H (fp32) and its token count; members maps weight name -> group."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    members: dict[str, str] = field(default_factory=dict)


def _grouped(modules: dict[str, nn.Module], seen: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """leader -> the modules (in order) that received the very same input tensor as it."""
    groups: dict[str, list[str]] = {}
    leader_of: dict[tuple, str] = {}
    for name in modules:
        x = seen.get(name)
        if x is None:
            continue
        key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()))
        groups.setdefault(leader_of.setdefault(key, name), []).append(name)
    return groups


def _recording(modules: dict[str, nn.Module], seen: dict[str, torch.Tensor]) -> list:
    """Pre-hooks keeping each module's input (alive until the probe ends, so two tensors can never
    share an address)."""
    return [m.register_forward_pre_hook(lambda mod, args, name=name: seen.__setitem__(name, args[0]))
            for name, m in modules.items()]


def find_groups(model: nn.Module, input_ids: torch.Tensor) -> dict[str, list[str]]:
    """leader module name -> modules that receive the very same input tensor in a forward pass."""
    modules = linear_modules(model)
    seen: dict[str, torch.Tensor] = {}
    hooks = _recording(modules, seen)
    try:
        with torch.no_grad():
            model(input_ids=input_ids[:1, :8], use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return _grouped(modules, seen)


def block_modules(runner: StreamedModel, index: int, block: nn.Module) -> dict[str, nn.Module]:
    """A materialized block's linear layers, by their names in the whole model."""
    return {f"{runner.stack}.{index}.{name}": m for name, m in block.named_modules() if is_linear(m)}


def find_block_groups(runner: StreamedModel, weights: Weights, input_ids: torch.Tensor
                      ) -> tuple[dict[str, list[str]], dict[str, int]]:
    """`find_groups` block by block (a probe window of 8 tokens through the streamed runner): the
    groups, in block order, and each group's input width."""
    groups: dict[str, list[str]] = {}
    dims: dict[str, int] = {}

    def probe(index: int, block: nn.Module, masks: Iterator[torch.Tensor]) -> None:
        modules = block_modules(runner, index, block)
        seen: dict[str, torch.Tensor] = {}
        hooks = _recording(modules, seen)
        try:
            for _ in masks:
                pass
        finally:
            for hook in hooks:
                hook.remove()
        found = _grouped(modules, seen)
        groups.update(found)
        dims.update({leader: in_features(modules[leader]) for leader in found})

    ids = input_ids[:1, :8]
    runner.hidden_states(weights, [(ids, torch.ones_like(ids))], probe)
    return groups, dims


class _Accumulator:
    """The hooks that add each batch's x^T x (non-pad tokens) to its group's sum."""

    def __init__(self, stats: Statistics, groups: dict[str, list[str]]) -> None:
        self.stats = stats
        self.mask: torch.Tensor | None = None
        self.packed = True
        self.finished: set[str] = set()
        for leader, members in groups.items():
            for member in members:
                stats.members[f"{member}.weight"] = leader

    def batch(self, mask: torch.Tensor) -> None:
        """The batch about to run: packed batches (no padding) skip the per-hook token selection."""
        self.mask, self.packed = mask, bool(mask.all())

    def hook(self, name: str):
        stats = self.stats

        def accumulate(module: nn.Module, args: tuple) -> None:
            x = args[0].reshape(-1, args[0].shape[-1])
            if not self.packed:
                x = x[self.mask.reshape(-1).bool()]
            x = x.float()
            if name not in stats.sums:
                stats.sums[name] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
            add_upper_gram(stats.sums[name], x)
            stats.counts[name] = stats.counts.get(name, 0) + x.shape[0]
        return accumulate

    def finish(self) -> None:
        """Mirror the sums not yet finished and move them to the host."""
        for name, h in self.stats.sums.items():
            if name not in self.finished:
                self.stats.sums[name] = symmetrize(h).cpu()
                self.finished.add(name)


def collect(model: nn.Module, windows: Windows, groups: dict[str, list[str]], batch_size: int,
            device: torch.device, advance: Callable[[int], None] = lambda n: None) -> Statistics:
    """Run the calibration windows through the loaded model and return the summed statistics."""
    modules = linear_modules(model)
    stats = Statistics()
    acc = _Accumulator(stats, groups)
    hooks = [modules[leader].register_forward_pre_hook(acc.hook(leader)) for leader in groups]
    try:
        with torch.no_grad():
            model.to(device)
            backbone = getattr(model, "base_model", model)  # no logits: the output layer is not collected
            for ids, mask in windows.batches(batch_size):
                acc.batch(mask.to(device))
                backbone(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
                advance(ids.shape[0])
    finally:
        for hook in hooks:
            hook.remove()
    acc.finish()
    return stats


def collect_blocks(runner: StreamedModel, weights: Weights, windows: Windows, groups: dict[str, list[str]],
                   dims: dict[str, int], batch_size: int, advance: Callable[[int], None] = lambda n: None,
                   finished: Callable[[str, torch.Tensor], None] | None = None) -> Statistics:
    """The statistics `collect` gives, the model never loaded (see the module's doc). Progress
    counts windows once per block. With `finished`, each group's H (a zero one if no window
    reached it) is handed to it, in the order of `groups`, as soon as its block is done, and not
    kept; the token counts always are."""
    stats = Statistics()
    acc = _Accumulator(stats, groups)

    def on_block(index: int, block: nn.Module, masks: Iterator[torch.Tensor]) -> None:
        modules = block_modules(runner, index, block)
        leaders = [leader for leader in groups if leader in modules]
        hooks = [modules[leader].register_forward_pre_hook(acc.hook(leader)) for leader in leaders]
        try:
            for mask in masks:
                acc.batch(mask)
                advance(mask.shape[0])
        finally:
            for hook in hooks:
                hook.remove()
        acc.finish()
        if finished is not None:
            for leader in leaders:
                finished(leader, stats.sums.pop(leader, torch.zeros(dims[leader], dims[leader])))

    with torch.no_grad():
        runner.hidden_states(weights, windows.batches(batch_size), on_block)
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
