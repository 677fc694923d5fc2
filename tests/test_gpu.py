"""The same stages on a CUDA device give the CPU's results (skipped where no GPU is present).

CI has no GPU; these run on a lent GPU machine (see README, "Tests"). Elementwise math may fuse
differently on the GPU, so merged weights are compared to the CPU run within float tolerance;
DARE masks come from the same CPU-side random stream, so they are identical.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import cli
from mergecli.engine.collect import collect, find_groups
from test_hessian_stage import data, recipe_with_data, tiny  # noqa: F401 - fixtures

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

MERGES = [{"name": "ta", "method": "task_arithmetic", "lambda": 0.8},
          {"name": "ties", "method": "ties", "density": 0.3},
          {"name": "dare", "method": "dare_ties", "density": 0.4, "seed": 2},
          {"name": "sg", "method": "ties", "score": "sparsegpt", "density": 0.3},
          {"name": "obs", "method": "task_arithmetic_topk", "score": "sparsegpt", "compensate": True},
          {"name": "regmean", "method": "regmean"}]


@pytest.mark.parametrize("layer_by_layer", [False, True])
def test_statistics_on_the_gpu_equal_the_cpu(tiny, layer_by_layer):  # noqa: F811
    model, windows = tiny
    groups = find_groups(model, windows.input_ids)
    cpu = collect(model, windows, groups, 4, torch.device("cpu"))
    if layer_by_layer:
        from mergecli.engine.collect import collect_blocks, find_block_groups
        from mergecli.engine.streamed import StreamedModel, model_weights

        runner, weights = StreamedModel(model.config, device="cuda"), model_weights(model)
        _, dims = find_block_groups(runner, weights, windows.input_ids)
        gpu = collect_blocks(runner, weights, windows, groups, dims, 4)
    else:
        gpu = collect(model, windows, groups, 4, torch.device("cuda"))
    for name in cpu.sums:
        assert gpu.sums[name].device.type == "cpu"
        assert torch.allclose(cpu.sums[name], gpu.sums[name], rtol=1e-4, atol=1e-4), name


def test_hessian_and_merge_on_the_gpu_match_the_cpu(tmp_path, models, data):  # noqa: F811
    outputs = {}
    for device in ("cpu", "cuda"):
        folder = tmp_path / device
        folder.mkdir()
        recipe = recipe_with_data(folder, models, data, MERGES)
        for stage in ("hessian", "merge"):
            result = cli("--json", "--device", device, stage, str(recipe), code=None)
            assert result.exit_code == 0, result.stderr
        outputs[device] = {m["name"]: load_file(folder / "out" / m["name"] / "model.safetensors") for m in MERGES}
        json.loads(result.stdout)
    for merge in MERGES:
        cpu, gpu = outputs["cpu"][merge["name"]], outputs["cuda"][merge["name"]]
        for name in cpu:
            assert torch.allclose(cpu[name], gpu[name], rtol=1e-4, atol=1e-5), (merge["name"], name)
