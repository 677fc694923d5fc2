"""Sums, norms and dot products over a whole tensor whose result does not depend on the number of
threads.

torch reduces a large tensor to one number by giving each thread a share of the entries and adding
the shares' partial sums (`two_pass_reduction` above its grain of 32768 entries), so `x.sum()`,
`torch.dot` (and so any angle or norm ratio) change in the last bits with `torch.set_num_threads`,
i.e. with `--workers`. A reduction with several outputs is split over the outputs instead, each
reduced by one thread in a fixed order. So here a long vector is cut into fixed blocks of `BLOCK`
entries, reduced block by block (many outputs), and the partial results reduced again; vectors of
at most `BLOCK` entries go to torch directly, in the order mergekit's (single-threaded at that
size) reductions use, so small tensors give mergekit's bits.
"""

from __future__ import annotations

import torch

BLOCK = 1 << 14
"""Below torch's parallel grain (32768): a reduction of one block always runs on one thread."""


def _split(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    whole = flat.numel() // BLOCK * BLOCK
    return flat[:whole].view(-1, BLOCK), flat[whole:]


def total(x: torch.Tensor) -> torch.Tensor:
    """The sum of every entry (0-d)."""
    flat = x.reshape(-1)
    while flat.numel() > BLOCK:
        blocks, rest = _split(flat)
        flat = torch.cat([blocks.sum(dim=1), rest.sum().reshape(1)])
    return flat.sum()


def norm(x: torch.Tensor) -> torch.Tensor:
    """The Euclidean norm of every entry (0-d): the norm of the blocks' norms."""
    flat = x.reshape(-1)
    while flat.numel() > BLOCK:
        blocks, rest = _split(flat)
        flat = torch.cat([torch.linalg.vector_norm(blocks, dim=1), torch.linalg.vector_norm(rest).reshape(1)])
    return torch.linalg.vector_norm(flat)


def dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """sum_i x_i y_i over every entry (0-d)."""
    if x.numel() <= BLOCK:
        return torch.dot(x.reshape(-1), y.reshape(-1))
    return total(x * y)


def last_sum(x: torch.Tensor) -> torch.Tensor:
    """x.sum(dim=-1, keepdim=True), reduced by blocks where that is a single output."""
    if x.dim() == 0 or x.numel() != x.shape[-1]:
        return x.sum(dim=-1, keepdim=True)
    return total(x).reshape([1] * x.dim())


def last_norm(x: torch.Tensor) -> torch.Tensor:
    """torch.norm(x, dim=-1, keepdim=True), reduced by blocks where that is a single output."""
    if x.dim() == 0 or x.numel() != x.shape[-1]:
        return torch.norm(x, dim=-1, keepdim=True)
    return norm(x).reshape([1] * x.dim())


def row_sums(x: torch.Tensor) -> torch.Tensor:
    """The sum of each row of a 2-D tensor (one per row), by blocks where there is one row."""
    return x.sum(dim=1) if x.shape[0] != 1 else total(x).reshape(1)
