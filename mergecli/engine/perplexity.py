"""Perplexity: next-token negative log-likelihood of a model on fixed token windows.

Per window, the NLL sum over non-pad next-token positions and their count; perplexity is
exp(sum of NLL / tokens) over all windows (token-weighted). The per-window sums are kept so two
models' difference can be given a paired standard error (every model sees the same windows).
"""

from __future__ import annotations

import torch

from .calibration import Windows


def next_token_nll(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position, the NLL of the next token (batch x seq_len - 1) and whether it counts (both
    it and the token before it are not padding). Differentiable: `lambda: learned` descends it."""
    valid = (mask[:, 1:] * mask[:, :-1]).bool()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")
    return nll, valid


def window_nlls(model: torch.nn.Module, windows: Windows, batch_size: int,
                device: torch.device) -> list[tuple[float, int]]:
    """(NLL sum, predicted tokens) of every window, over non-pad positions."""
    found: list[tuple[float, int]] = []
    with torch.no_grad():
        for ids, mask in windows.batches(batch_size):
            ids, mask = ids.to(device), mask.to(device)
            nll, valid = next_token_nll(model(input_ids=ids, attention_mask=mask, use_cache=False).logits, ids, mask)
            sums = (nll.double() * valid).sum(dim=1)
            found += [(float(s), int(n)) for s, n in zip(sums, valid.sum(dim=1))]
    return found


def nll_sum(model: torch.nn.Module, windows: Windows, batch_size: int, device: torch.device) -> tuple[float, int]:
    """(sum of next-token NLL, number of predicted tokens) over non-pad positions."""
    per_window = window_nlls(model, windows, batch_size, device)
    return sum(s for s, _ in per_window), sum(n for _, n in per_window)
