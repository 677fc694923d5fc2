"""Which entries of a task vector survive: exact top-k and seeded Bernoulli masks.

Pure tensor functions. Top-k keeps exactly k entries (never a threshold, which keeps more on
ties); Bernoulli masks draw from a generator derived from (seed, tensor name, model index), so a
mask never depends on the order tensors are processed in or on how many workers run.
"""

from __future__ import annotations

import hashlib

import torch


def keep_count(n: int, density: float) -> int:
    """Entries kept out of n: round(density * n), at least 1."""
    return max(1, min(n, round(density * n)))


def topk_mask(scores: torch.Tensor, density: float, per_row: bool = False) -> torch.Tensor:
    """Boolean mask of the k highest scores, per tensor or per row (dim 0 indexes rows).

    `per_row` expects `scores` oriented out x in (rows are output features).
    """
    if scores.dim() < 2:
        per_row = False
    if per_row:
        flat = scores.reshape(scores.shape[0], -1)
        k = keep_count(flat.shape[1], density)
        mask = torch.zeros_like(flat, dtype=torch.bool)
        mask.scatter_(1, flat.topk(k, dim=1, sorted=False).indices, True)
        return mask.reshape(scores.shape)
    flat = scores.reshape(-1)
    k = keep_count(flat.numel(), density)
    if k == flat.numel():
        return torch.ones_like(scores, dtype=torch.bool)
    threshold = kth_largest(flat, k)
    mask = flat >= threshold
    extra = int(mask.sum()) - k
    if extra > 0:  # ties at the threshold: keep the first ones in flat order, drop the last `extra`
        mask[(flat == threshold).nonzero().squeeze(1)[-extra:]] = False
    return mask.reshape(scores.shape)


def kth_largest(flat: torch.Tensor, k: int, sample: int = 1 << 20) -> torch.Tensor:
    """The exact k-th largest value, in O(n) without a full sort or a top-k of size k.

    Large tensors: a fixed-seed sample brackets the answer, one counting pass checks the bracket,
    and the exact selection runs on the few candidates inside it (falls back to kthvalue on the
    whole tensor if the bracket misses, which only costs time). `torch.quantile` cannot do this:
    it refuses inputs above 2^24 elements.
    """
    n = flat.numel()
    if n <= 4 * sample:
        return flat.kthvalue(n - k + 1).values
    picks = flat[torch.randint(n, (sample,), generator=torch.Generator().manual_seed(0)).to(flat.device)]
    q = (n - k) / n  # fraction of entries strictly below the answer
    margin = 8 / sample ** 0.5 + 1 / sample
    lo = picks.kthvalue(max(1, int((q - margin) * sample))).values
    hi = picks.kthvalue(min(sample, int((q + margin) * sample) + 1)).values
    above = int((flat > hi).sum())
    inside = flat[(flat >= lo) & (flat <= hi)]
    if above >= k or above + inside.numel() < k:
        return flat.kthvalue(n - k + 1).values
    return inside.kthvalue(inside.numel() - (k - above) + 1).values


def tensor_generator(seed: int, tensor_name: str, model_index: int) -> torch.Generator:
    """A CPU generator whose stream depends only on (seed, tensor name, model index)."""
    digest = hashlib.sha256(f"{seed}\0{tensor_name}\0{model_index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def bernoulli_mask(shape: torch.Size, density: float, generator: torch.Generator) -> torch.Tensor:
    """Each entry kept independently with probability `density` (DARE's drop)."""
    return torch.rand(shape, generator=generator) < density


def rank_probabilities(scores: torch.Tensor, density: float, per_row: bool = False) -> torch.Tensor:
    """DARE with an importance score: keep-probabilities that rise linearly with the score's rank.

    p = d (1 - s) + 2 d s r, where r in [0, 1] is the entry's rank (0 = lowest score, 1 = highest,
    within the tensor or row) and s = min(1, (1 - d) / d). The mean of p is exactly d, p never
    exceeds 1, and for d <= 0.5 the single lowest-ranked entry has p = 0 (never kept). Survivors
    are rescaled by 1/p, so every entry with p > 0 is unbiased: E[kept] = tau.
    """
    flat = scores.reshape(scores.shape[0], -1) if per_row and scores.dim() >= 2 else scores.reshape(1, -1)
    n = flat.shape[1]
    ranks = torch.empty_like(flat, dtype=torch.float64)
    order = flat.argsort(dim=1)
    positions = torch.arange(n, dtype=torch.float64, device=flat.device).expand_as(flat)
    ranks.scatter_(1, order, positions)
    r = ranks / max(n - 1, 1)
    s = min(1.0, (1.0 - density) / density)
    return (density * (1 - s) + 2 * density * s * r).reshape(scores.shape)
