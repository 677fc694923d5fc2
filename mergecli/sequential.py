"""Sequential RegMean (RegMean++, Nguyen et al. 2025): merge a model block by block, each block's
Grams computed from what the *already merged* blocks make of each fine-tune's calibration data.

Plain RegMean fits block l of the merge to the inputs block l saw inside each fine-tune. The
merged model feeds block l something else: the output of merged blocks < l. RegMean++ closes that
mismatch: for fine-tune i, its calibration windows go through the merged blocks < l, then through
fine-tune i's own block l with hooks collecting X^T X of every linear input; block l is merged
from those Grams; the windows then advance through the merged block l. The candidate's own block
supplies the targets (its outputs on those inputs), so each merged block is fitted to reproduce
every fine-tune's block on the inputs the merged model will actually produce.

Cost: per fine-tune, one pass through every block for the Grams and one through the merged block
(about two forward passes of the calibration windows), with one block's weights swapped at a time;
memory: the calibration hidden states of every fine-tune (n_tokens x d floats each).

This module runs blocks and hooks; the per-block math is a callable (`merge_block`), e.g.
`regmean_block`, so it stays pure and testable on its own.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from .methods.hessian_math import regmean_delta

BlockInputs = list[tuple[torch.Tensor, dict]]
"""Per batch: (hidden states entering the block, keyword arguments of the block's forward)."""

MergeBlock = Callable[[int, list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]], dict[str, torch.Tensor]]
"""(block index, each model's block state dict, each model's Grams by weight name) -> merged block state."""


class _Stop(Exception):
    pass


def capture_block_inputs(model: nn.Module, first_block: nn.Module, batches: Sequence[torch.Tensor]) -> BlockInputs:
    """What enters `first_block` for each batch of input ids (the model is stopped there)."""
    got: BlockInputs = []

    def capture(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        extra = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        got.append((hidden.detach().clone(), extra))
        raise _Stop

    hook = first_block.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            for ids in batches:
                try:
                    model(input_ids=ids, use_cache=False)
                except _Stop:
                    pass
    finally:
        hook.remove()
    return got


def run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def block_grams(block: nn.Module, inputs: BlockInputs) -> dict[str, torch.Tensor]:
    """G = X^T X / n (fp64) of every nn.Linear input in `block`, by weight name
    relative to the block. Linears reading the same tensor (q/k/v, gate/up) get the same Gram."""
    linears = {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    seen: dict[tuple, str] = {}
    alias: dict[str, str] = {}

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()))
            if key in seen:  # same input tensor as an earlier linear in this pass: share its Gram
                alias[name] = seen[key]
                return
            seen[key] = name
            flat = x.reshape(-1, x.shape[-1]).to(torch.float64)
            sums[name] = sums.get(name, 0) + flat.T @ flat
            counts[name] = counts.get(name, 0) + flat.shape[0]
        return hook

    hooks = [m.register_forward_pre_hook(hook_for(name)) for name, m in linears.items()]
    try:
        with torch.no_grad():
            for hidden, kwargs in inputs:
                seen.clear()
                run_block(block, hidden, kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    grams = {f"{name}.weight": sums[name] / counts[name] for name in sums}
    grams.update({f"{name}.weight": grams[f"{leader}.weight"] for name, leader in alias.items()})
    return grams


def regmean_block(base: dict[str, torch.Tensor], models: list[dict[str, torch.Tensor]],
                  grams: list[dict[str, torch.Tensor]], weights: torch.Tensor, alpha: float = 0.9
                  ) -> dict[str, torch.Tensor]:
    """RegMean of one block: every weight with a Gram by (sum w_i W_i G~_i)(sum w_i G~_i)^-1, every
    other tensor (norm scales, biases) by the weighted mean."""
    out = {}
    for key, b in base.items():
        taus = [m[key].to(torch.float64) - b.to(torch.float64) for m in models]
        if key in grams[0]:
            delta = regmean_delta(taus, [g[key] for g in grams], weights, alpha)
        else:
            delta = sum(w * t for w, t in zip(weights.tolist(), taus)) / float(weights.sum())
        out[key] = (b.to(torch.float64) + delta).to(b.dtype)
    return out


def sequential_merge(blocks: Sequence[nn.Module], model_blocks: list[list[dict[str, torch.Tensor]]],
                     inputs: list[BlockInputs], merge_block: MergeBlock) -> list[dict[str, torch.Tensor]]:
    """Merge `blocks` in place, in order; returns each block's merged state dict.

    `blocks`: the working block stack (its weights are overwritten; start from the base).
    `model_blocks[i][l]`: fine-tune i's state dict of block l (keys relative to the block).
    `inputs[i]`: fine-tune i's calibration batches entering block 0 of the *merged* model (i.e.
    after the merged embedding).
    """
    states = [list(batches) for batches in inputs]
    merged_states = []
    for index, block in enumerate(blocks):
        grams = []
        for i, own in enumerate(model_blocks):
            block.load_state_dict(own[index])
            grams.append(block_grams(block, states[i]))
        merged = merge_block(index, [own[index] for own in model_blocks], grams)
        block.load_state_dict(merged)
        merged_states.append(merged)
        with torch.no_grad():
            states = [[(run_block(block, hidden, kwargs), kwargs) for hidden, kwargs in batches] for batches in states]
    return merged_states
