"""Which entries of a task vector survive: exact top-k and seeded Bernoulli masks.

Pure tensor functions. Top-k keeps exactly k entries (never a threshold alone, which keeps more on
ties); it is split into finding the threshold on the whole tensor (`topk_threshold`) and applying
it to any run of consecutive entries (`TopK.mask`), so a merge can stream a tensor in chunks.
Random draws come from a counter-addressed stream keyed by (seed, tensor name, model index): the
draw for entry e is the same whatever chunk it is processed in, in whatever order, by however
many workers.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch


def keep_count(n: int, density: float) -> int:
    """Entries kept out of n: round(density * n), at least 1."""
    return max(1, min(n, round(density * n)))


@dataclass
class TopK:
    """Keep entries scoring above `threshold`, plus the first `ties` entries equal to it.

    `ties` counts down as chunks are masked in flat order, which makes chunked masking identical
    to masking the whole tensor at once.
    """

    threshold: torch.Tensor
    ties: int

    def mask(self, scores: torch.Tensor) -> torch.Tensor:
        keep = scores > self.threshold
        if self.ties > 0:
            equal = scores == self.threshold
            count = int(torch.count_nonzero(equal))
            if count <= self.ties:
                keep |= equal
            else:
                flat = keep.view(-1)
                flat[equal.reshape(-1).nonzero().squeeze(1)[: self.ties]] = True
                count = self.ties
            self.ties -= count
        return keep


def topk_threshold(flat: torch.Tensor, k: int) -> TopK:
    """The selection of the k highest of `flat`: ties at the threshold keep the first in flat order."""
    threshold, above = kth_largest(flat, k)
    return TopK(threshold, k - above)


def topk_mask(scores: torch.Tensor, density: float, per_row: bool = False) -> torch.Tensor:
    """Boolean mask of the k highest scores, per tensor or per row (dim 0 indexes rows).

    `per_row` expects `scores` oriented out x in (rows are output features).
    """
    if per_row and scores.dim() >= 2:
        flat = scores.reshape(scores.shape[0], -1)
        k = keep_count(flat.shape[1], density)
        mask = torch.zeros_like(flat, dtype=torch.bool)
        mask.scatter_(1, flat.topk(k, dim=1, sorted=False).indices, True)
        return mask.reshape(scores.shape)
    flat = scores.reshape(-1)
    k = keep_count(flat.numel(), density)
    if k == flat.numel():
        return torch.ones_like(scores, dtype=torch.bool)
    return topk_threshold(flat, k).mask(flat).reshape(scores.shape)


SCAN_PIECE = 1 << 18


def kth_largest(flat: torch.Tensor, k: int) -> tuple[torch.Tensor, int]:
    """The exact k-th largest value and how many entries are strictly above it, in O(n) without a
    full sort or a top-k of size k.

    `kthvalue` costs ~15 ns per entry here, so it only runs on small inputs: above 64k entries a
    fixed-seed sample of s ~ (1.5 n)^(2/3) entries brackets the answer (about +-6 standard
    deviations of the sample quantile), one pass counts the entries above the bracket and gathers
    the few percent inside it, and the exact selection runs on those. If the bracket misses (it
    practically never does), the whole tensor is selected directly: that only costs time.
    `torch.quantile` cannot do this: it refuses inputs above 2^24 elements.
    """
    n = flat.numel()
    if n <= 1 << 16:
        value = flat.kthvalue(n - k + 1).values
        return value, int(torch.count_nonzero(flat > value))
    sample = int((1.5 * n) ** (2 / 3))
    picks = flat[torch.randint(n, (sample,), generator=torch.Generator().manual_seed(0)).to(flat.device)]
    q = (n - k) / n  # fraction of entries strictly below the answer
    margin = 3 / sample ** 0.5 + 1 / sample
    lo = picks.kthvalue(max(1, int((q - margin) * sample))).values
    hi = picks.kthvalue(min(sample, int((q + margin) * sample) + 1)).values
    above, parts = 0, []
    for piece in flat.split(SCAN_PIECE):  # one pass over memory; the comparisons stay in cache
        above += int(torch.count_nonzero(piece > hi))
        parts.append(piece[(piece >= lo) & (piece <= hi)])
    inside = torch.cat(parts)
    if above >= k or above + inside.numel() < k:
        value = flat.kthvalue(n - k + 1).values
        return value, int(torch.count_nonzero(flat > value))
    value = inside.kthvalue(inside.numel() - (k - above) + 1).values
    return value, above + int(torch.count_nonzero(inside > value))


@dataclass(frozen=True)
class RandomStream:
    """32-bit uniform draws addressed by entry index, from a PCG64 stream keyed by a 128-bit seed.

    Entry e uses half of the stream's (e // 2)-th 64-bit output; jumping to any entry is O(1)
    (`advance`), so a chunk starting at an even entry draws exactly what the whole tensor would.
    numpy's PCG64 makes these draws about 3x faster than torch's CPU generator.
    """

    key: int

    def uint32(self, start: int, count: int) -> np.ndarray:
        bits = np.random.PCG64(self.key)
        bits.advance(start // 2)
        words = bits.random_raw((start % 2 + count + 1) // 2).view(np.uint32)
        return words[start % 2: start % 2 + count]

    def uniform(self, shape: torch.Size, start: int = 0) -> torch.Tensor:
        """U(0, 1) in float64, one per entry of a chunk of `shape` starting at entry `start`."""
        n = int(np.prod(shape, dtype=np.int64))
        return torch.from_numpy((self.uint32(start, n) + 0.5) / 2.0 ** 32).reshape(shape)


def random_stream(seed: int, tensor_name: str, model_index: int) -> RandomStream:
    """The stream of one (seed, tensor, model): independent of everything else in the run."""
    digest = hashlib.sha256(f"{seed}\0{tensor_name}\0{model_index}".encode()).digest()
    return RandomStream(int.from_bytes(digest[:16], "little"))


def bernoulli_mask(shape: torch.Size, density: float, stream: RandomStream, start: int = 0) -> torch.Tensor:
    """Each entry kept independently with probability `density` (DARE's drop), for the chunk of
    `shape` that starts at entry `start` of its tensor."""
    n = int(np.prod(shape, dtype=np.int64))
    cut = min(round(density * 2.0 ** 32), 2 ** 32)
    return torch.from_numpy(np.less(stream.uint32(start, n), cut)).reshape(shape)


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
