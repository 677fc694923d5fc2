"""RegMean++ on a tiny 2-block residual MLP, checked against an explicit sequential least-squares
computation written out with torch.linalg.lstsq (alpha = 1: RegMean is then exact least squares)."""

from __future__ import annotations

import torch
from torch import nn

from mergecli.sequential import block_grams, regmean_block, run_block, sequential_merge

D = torch.float64


class Block(nn.Module):
    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.up = nn.Linear(d, h, bias=False)
        self.gate = nn.Linear(d, h, bias=False)  # reads the same input as `up`: shares its Gram
        self.down = nn.Linear(h, d, bias=False)
        self.scale = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor, shift: float = 0.0) -> torch.Tensor:
        return x + self.scale * self.down(torch.tanh(self.up(x)) * self.gate(x)) + shift


def _lstsq_merge(xs, ws):
    """argmin_W sum_i ||X_i W^T - X_i W_i^T||^2 / n_i, stacked."""
    a = torch.cat([x / x.shape[0] ** 0.5 for x in xs])
    y = torch.cat([x @ w.T / x.shape[0] ** 0.5 for x, w in zip(xs, ws)])
    return torch.linalg.lstsq(a, y).solution.T


def test_sequential_regmean_matches_explicit_sequential_least_squares():
    torch.manual_seed(0)
    d, h, n_models, n_blocks = 4, 6, 3, 2
    base = [Block(d, h).to(D) for _ in range(n_blocks)]
    models = []
    for _ in range(n_models):
        blocks = []
        for b in base:
            sd = {k: v + 0.3 * torch.randn_like(v) for k, v in b.state_dict().items()}
            blocks.append(sd)
        models.append(blocks)
    data = [[(torch.randn(2, 5, d, dtype=D) * (i + 1), {"shift": 0.1})] for i in range(n_models)]
    weights = torch.ones(n_models, dtype=D)

    # explicit reference: block by block, inputs from the merged blocks so far
    xs = [torch.cat([x for x, _ in batches]).reshape(-1, d) for batches in data]
    expected = []
    for l in range(n_blocks):
        own = [m[l] for m in models]
        hidden = [torch.tanh(x @ sd["up.weight"].T) * (x @ sd["gate.weight"].T) for x, sd in zip(xs, own)]
        merged = {"up.weight": _lstsq_merge(xs, [sd["up.weight"] for sd in own]),
                  "gate.weight": _lstsq_merge(xs, [sd["gate.weight"] for sd in own]),
                  "down.weight": _lstsq_merge(hidden, [sd["down.weight"] for sd in own]),
                  "scale": sum(sd["scale"] for sd in own) / n_models}
        expected.append(merged)
        block = Block(d, h).to(D)
        block.load_state_dict(merged)
        with torch.no_grad():
            xs = [block(x, 0.1) for x in xs]

    work = [Block(d, h).to(D) for _ in range(n_blocks)]
    for w, b in zip(work, base):
        w.load_state_dict(b.state_dict())
    base_states = [b.state_dict() for b in base]
    got = sequential_merge(work, models, data,
                           lambda l, own, grams: regmean_block(base_states[l], own, grams, weights, alpha=1.0))
    for l in range(n_blocks):
        for key, value in expected[l].items():
            assert torch.allclose(got[l][key], value, atol=1e-9), (l, key)
    # and it differs from plain RegMean on block 1, whose inputs in each fine-tune were its own
    plain_inputs = []
    for i, m in enumerate(models):
        b0 = Block(d, h).to(D)
        b0.load_state_dict(m[0])
        plain_inputs.append([(run_block(b0, x, kw).detach(), kw) for x, kw in data[i]])
    plain_grams = []
    for i, m in enumerate(models):
        b1 = Block(d, h).to(D)
        b1.load_state_dict(m[1])
        plain_grams.append(block_grams(b1, plain_inputs[i]))
    plain = regmean_block(base_states[1], [m[1] for m in models], plain_grams, weights, alpha=1.0)
    assert not torch.allclose(plain["up.weight"], got[1]["up.weight"], atol=1e-6)


def test_block_grams_share_one_gram_per_input_tensor():
    torch.manual_seed(1)
    block = Block(3, 4).to(D)
    x = torch.randn(2, 7, 3, dtype=D)
    grams = block_grams(block, [(x, {}), (2 * x, {})])
    flat = torch.cat([x, 2 * x]).reshape(-1, 3)
    assert torch.allclose(grams["up.weight"].double(), flat.T @ flat / 28, atol=1e-5)
    assert grams["gate.weight"] is grams["up.weight"]
    assert grams["down.weight"].shape == (4, 4)
