"""Perplexity: next-token negative log-likelihood of a model on fixed token windows.

Per window, the NLL sum over non-pad next-token positions and their count; perplexity is
exp(sum of NLL / tokens) over all windows (token-weighted). The per-window sums are kept so two
models' difference can be given a paired standard error (every model sees the same windows).
"""

from __future__ import annotations

import torch

from .calibration import Windows


def window_nlls(model: torch.nn.Module, windows: Windows, batch_size: int,
                device: torch.device) -> list[tuple[float, int]]:
    """(NLL sum, predicted tokens) of every window, over non-pad positions."""
    found: list[tuple[float, int]] = []
    with torch.no_grad():
        for ids, mask in windows.batches(batch_size):
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
            target = ids[:, 1:]
            valid = (mask[:, 1:] * mask[:, :-1]).bool()
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                    target.reshape(-1), reduction="none").reshape(target.shape)
            sums = (nll.double() * valid).sum(dim=1)
            found += [(float(s), int(n)) for s, n in zip(sums, valid.sum(dim=1))]
    return found


def nll_sum(model: torch.nn.Module, windows: Windows, batch_size: int, device: torch.device) -> tuple[float, int]:
    """(sum of next-token NLL, number of predicted tokens) over non-pad positions."""
    per_window = window_nlls(model, windows, batch_size, device)
    return sum(s for s, _ in per_window), sum(n for _, n in per_window)
