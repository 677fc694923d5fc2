"""Streaming a tensor in chunks never changes a merge: checked against whole-tensor computations.

`merge_tensor` processes rows in chunks of about CHUNK_ELEMENTS entries; these tests shrink the
chunk so that small tensors span many chunks (with ties at the top-k threshold crossing chunk
boundaries), and compare with the same merge done in one piece and with peft's merge_utils.
"""

import threading
import time

import numpy as np
import pytest
import torch
from peft.utils import merge_utils

from mergecli.engine.writer import in_order
from mergecli.methods import catalog, pipeline
from mergecli.methods.pipeline import NonFiniteTaskVector, TaskTensor, TensorPlan, merge_tensor
from mergecli.methods.sparsify import bernoulli_mask, random_stream
from mergecli.methods.stats import LayerStats
from mergecli.models.safetensors_io import TensorInfo

METHODS = catalog()


def taus(n_models: int, shape: tuple[int, ...], seed: int, ties: bool = False) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = [torch.randn(shape, generator=gen) for _ in range(n_models)]
    if ties:  # many equal magnitudes, so the k-th value is shared by entries in several chunks
        out = [t.mul(4).round().div(4) for t in out]
    return out


CASES = [
    ("ties", {"score": "magnitude", "density": 0.2}),
    ("ties", {"score": "magnitude", "density": 0.3, "topk": "row"}),
    ("dare_ties", {"score": "random", "density": 0.2, "seed": 3}),
    ("dare_linear", {"score": "random", "density": 0.5, "seed": 4}),
    ("task_arithmetic_topk", {"score": "magnitude", "density": 0.1}),
    ("task_arithmetic", {}),
    ("ties", {"score": "sparsegpt", "density": 0.25}),
    ("ties", {"score": "wanda", "density": 0.25}),
    ("ties", {"score": "magnitude", "density": 0.3, "rescale": "l1", "normalize": False}),
    ("dare_ties", {"score": "random", "density": 0.3, "seed": 5, "rescale": "l1"}),
    ("dare_linear", {"score": "random", "density": 0.4, "rescale": "none", "normalize": True}),
    ("della", {"density": 0.4, "epsilon": 0.2, "seed": 6}),
    ("della_linear", {"density": 0.5, "epsilon": 0.1, "seed": 7, "rescale": "l1"}),
    ("della", {"density": 0.3, "epsilon": 0.1, "score": "wanda", "rescale": "none"}),
    ("breadcrumbs", {"density": 0.3, "gamma": 0.05}),
    ("breadcrumbs_ties", {"density": 0.5, "gamma": 0.1, "rescale": "l1"}),
    ("breadcrumbs", {"density": 0.2, "gamma": 0.1, "score": "sparsegpt"}),
    ("linear", {"base_weight": 0.5}),
    ("linear", {"normalize": False}),
]


@pytest.mark.parametrize("method,params", CASES)
@pytest.mark.parametrize("transposed", [False, True])
def test_chunked_merge_equals_one_piece(monkeypatch, method, params, transposed):
    t = taus(3, (37, 24), seed=1, ties=True)
    stats = None
    if params.get("score") in ("sparsegpt", "wanda"):
        x = torch.randn(200, 24, generator=torch.Generator().manual_seed(2))
        stats = [LayerStats(x.T @ x / 200) for _ in t]
    stored = [x.T.contiguous() for x in t] if transposed else t
    base = taus(1, stored[0].shape, seed=3)[0] if METHODS[method].needs_base else None
    plan = TensorPlan(METHODS[method], [1.0, 0.5, 2.0], params, "layer.w", transposed)
    monkeypatch.setattr(pipeline, "CHUNK_ELEMENTS", 10**9)
    whole, kept_whole, _ = merge_tensor(plan, stored, stats, base)
    monkeypatch.setattr(pipeline, "CHUNK_ELEMENTS", 50)  # 2 rows per chunk: 19 chunks
    chunked, kept_chunked, _ = merge_tensor(plan, stored, stats, base)
    assert torch.equal(whole, chunked) and kept_whole == kept_chunked


@pytest.mark.parametrize("method,params", [("della", {"density": 0.4, "epsilon": 0.2}),
                                           ("breadcrumbs", {"density": 0.3, "gamma": 0.1})])
def test_new_trims_of_one_dimensional_tensors_chunk_alike(monkeypatch, method, params):
    """A 1-D tensor is one row for DELLA's ranks (so the pipeline takes it whole) and one flat band
    for Breadcrumbs (gathered over chunks)."""
    t = taus(3, (300,), seed=8, ties=True)
    monkeypatch.setattr(pipeline, "CHUNK_ELEMENTS", 10**9)
    whole, _, _ = merge_tensor(TensorPlan(METHODS[method], [1.0, 1.0, 1.0], params, "norm.w"), t)
    monkeypatch.setattr(pipeline, "CHUNK_ELEMENTS", 16)
    chunked, _, _ = merge_tensor(TensorPlan(METHODS[method], [1.0, 1.0, 1.0], params, "norm.w"), t)
    assert torch.equal(whole, chunked)


def test_chunked_ties_matches_peft_on_a_tensor_of_many_chunks(monkeypatch):
    monkeypatch.setattr(pipeline, "CHUNK_ELEMENTS", 1000)
    t = taus(3, (300, 40), seed=5)
    ours, kept, offered = merge_tensor(TensorPlan(METHODS["ties"], [1.0] * 3, {"score": "magnitude", "density": 0.25},
                                                  "w"),
                                       t)
    assert torch.allclose(ours, merge_utils.ties(t, torch.ones(3), density=0.25), atol=1e-6)
    assert (kept, offered) == (3 * 3000, 3 * 12000)


def test_a_finetune_stored_in_bf16_merges_like_its_fp32_difference(monkeypatch):
    """Full fine-tunes are read as stored and differenced a chunk at a time: same result as an fp32 tau."""
    monkeypatch.setattr(pipeline, "CHUNK_ELEMENTS", 64)
    gen = torch.Generator().manual_seed(7)
    base = torch.randn(40, 16, generator=gen).bfloat16()
    fts = [(base.float() + 0.05 * torch.randn(40, 16, generator=gen)).bfloat16() for _ in range(2)]
    by_reference = [TaskTensor(ft, base) for ft in fts]
    materialized = [ft.float() - base.float() for ft in fts]
    for method, params in CASES[:6]:
        a, _, _ = merge_tensor(TensorPlan(METHODS[method], [1.0, 1.0], {**params, "lambda": 0.8}, "w",
                                          dtype=torch.bfloat16),
                               by_reference, base=base)
        delta, _, _ = merge_tensor(TensorPlan(METHODS[method], [1.0, 1.0], params, "w"), materialized)
        assert a.dtype == torch.bfloat16
        assert torch.equal(a, (base.float() + 0.8 * delta).bfloat16()), method


def test_dare_draws_do_not_depend_on_the_chunking():
    stream = random_stream(0, "x", 1)
    whole = stream.uint32(0, 1001)
    for cut in (1, 2, 500, 501, 1000):
        assert np.array_equal(np.concatenate([stream.uint32(0, cut), stream.uint32(cut, 1001 - cut)]), whole)
    mask = bernoulli_mask(torch.Size([100, 10]), 0.3, stream)
    assert torch.equal(mask[40:60], bernoulli_mask(torch.Size([20, 10]), 0.3, stream, start=400))
    assert abs(mask.float().mean().item() - 0.3) < 0.05


def test_bernoulli_cut_is_the_density():
    big = bernoulli_mask(torch.Size([1000, 1000]), 0.2, random_stream(1, "y", 0))
    assert abs(big.float().mean().item() - 0.2) < 0.002  # 1e6 draws: std 4e-4


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_task_vector_is_reported_with_its_model(monkeypatch, bad):
    monkeypatch.setattr(pipeline, "CHUNK_ELEMENTS", 40)
    t = taus(3, (20, 10), seed=9)
    t[2][17, 3] = bad  # in a late chunk
    with pytest.raises(NonFiniteTaskVector) as info:
        merge_tensor(TensorPlan(METHODS["ties"], [1.0] * 3, {"score": "magnitude", "density": 0.2}, "w"), t)
    assert info.value.index == 2


def test_tensors_merged_ahead_stay_within_the_costliest_working_set():
    """The writer computes tensors ahead in threads only while their working sets (here: given
    costs, as the merge gives a data-aware method's fp64 Grams) add up to at most the largest: two
    7B down projections' RegMean solves never run at once, two small tensors do."""
    costs = {"down.0": 10, "down.1": 10, "q.0": 3, "k.0": 3, "v.0": 3, "down.2": 10}
    items = [TensorInfo(name, (1,), torch.float32) for name in costs]
    lock, running, peaks, overlapped = threading.Lock(), [], [], []

    def compute(info):
        with lock:
            running.append(info.name)
            peaks.append(sum(costs[n] for n in running))
            overlapped.append(len(running) > 1)
        time.sleep(0.05)
        with lock:
            running.remove(info.name)
        return info.name

    out = list(in_order(items, lambda n: n, compute, 3, lambda i: costs[i.name]))
    assert [name for _, name, _ in out] == list(costs)
    assert max(peaks) <= 10 and any(overlapped)
