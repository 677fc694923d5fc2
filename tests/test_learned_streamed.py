"""`lambda: learned` block by block equals learning on the loaded model: the gradient of the scales,
reduced per block to <dL/dW, part_i>, against plain autograd through
theta(s) = theta_base + sum_i s[group, i] part_i on the whole model (torch.func.functional_call), and
the scales after the same Adam steps."""

import torch
from torch.func import functional_call
from transformers import AutoModelForCausalLM

from mergecli.distributed import SINGLE
from mergecli.engine.calibration import Windows
from mergecli.engine.streamed import StreamedModel, model_weights, window_means
from mergecli.quality.learn import _gradient
from mergecli.quality.scales import group_of
from mergecli.quality.scoring import plus


def setup(models):
    base = AutoModelForCausalLM.from_pretrained(models / "base").eval()
    fine = [AutoModelForCausalLM.from_pretrained(models / name).state_dict() for name in ("ft_a", "ft_b")]
    state = {n: t.detach() for n, t in base.named_parameters()}  # a tied pair once
    parts = [{n: f[n] - t for n, t in state.items() if not torch.equal(f[n], t)} for f in fine]
    names = sorted({n for p in parts for n in p})
    from mergecli.models.architecture import describe

    arch = describe(models / "base")
    groups = sorted({group_of(arch, n) for n in names})
    row = {n: groups.index(group_of(arch, n)) for n in names}
    ids = torch.randint(4, 90, (3, 2, 16), generator=torch.Generator().manual_seed(0))
    chosen = [(Windows(ids[k], torch.ones_like(ids[k])), torch.tensor([0, 1])) for k in range(3)]
    return base, state, parts, names, groups, row, chosen


def loss(values):
    """Two domains and a hinge on a third text, as learn.py's loss is built."""
    domain = (values[0].mean() / 0.8 + values[1].mean() / 0.6) / 2
    return domain + (values[2] - 4.0).mean().clamp(min=0) / 0.7


def reference_gradient(base, state, parts, names, row, chosen, scales):
    s = scales.clone().requires_grad_()
    weights = {}
    for n in names:
        w = state[n].float()
        for i, part in enumerate(parts):
            if n in part:
                w = w + s[row[n], i] * part[n]
        weights[n] = w
    values = []
    for windows, pick in chosen:
        ids, mask = windows.input_ids[pick], windows.attention_mask[pick]
        logits = functional_call(base, weights, (), {"input_ids": ids, "attention_mask": mask, "use_cache": False}).logits
        values.append(window_means(logits, ids, mask))
    loss(values).backward()
    return s.grad


def streamed_gradient(base, parts, row, chosen, scales):
    runner = StreamedModel(base.config)
    stored = [lambda names, p=p: {n: p[n] for n in names if n in p} for p in parts]
    weights = plus(model_weights(base), stored, lambda n, i: float(scales[row[n], i]) if n in row else None)
    return _gradient(runner, weights, stored, row, chosen, loss, 4, SINGLE, scales.shape)


def test_the_scales_gradient_block_by_block_is_the_whole_models(models):
    base, state, parts, names, groups, row, chosen = setup(models)
    scales = 1 + 0.3 * torch.randn(len(groups), 2, generator=torch.Generator().manual_seed(1))
    expected = reference_gradient(base, state, parts, names, row, chosen, scales)
    found = streamed_gradient(base, parts, row, chosen, scales)
    assert float(expected.abs().max()) > 1e-4  # a real gradient
    torch.testing.assert_close(found, expected, rtol=1e-4, atol=1e-6)


def test_the_same_adam_steps_give_the_same_scales(models):
    base, state, parts, names, groups, row, chosen = setup(models)
    learned = []
    for gradient in (lambda s: reference_gradient(base, state, parts, names, row, chosen, s),
                     lambda s: streamed_gradient(base, parts, row, chosen, s)):
        scales = torch.ones(len(groups), 2, requires_grad=True)
        optimizer = torch.optim.Adam([scales], lr=0.05)
        for _ in range(4):
            optimizer.zero_grad()
            scales.grad = gradient(scales.detach())
            optimizer.step()
        learned.append(scales.detach())
    assert float((learned[0] - 1).abs().max()) > 0.1  # the scales moved
    torch.testing.assert_close(learned[1], learned[0], rtol=0, atol=1e-5)
