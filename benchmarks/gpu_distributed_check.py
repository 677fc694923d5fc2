"""The GPU checks of issue #13, in one call on a machine with one CUDA GPU (about 3 minutes).

    PYTHONPATH=. python benchmarks/gpu_distributed_check.py --out gpu-distributed.json
    PYTHONPATH=. python benchmarks/gpu_distributed_check.py --device cpu   # a dry run of part 1 (gloo)

1. The nccl path: the tests' tiny models (three fine-tunes, four merges, evaluation) through
   `python -m mergecli --device cuda compare` and through `python -m torch.distributed.run
   --standalone --nproc-per-node 1 -m mergecli --device cuda compare`; the second must say it
   joined with backend nccl, and give the same Hessians (to 1e-6 of max |H|, token counts
   exactly), merges (bit for bit) and perplexities (to 1e-6) as the first.
2. GPU memory of `hessian --layer-by-layer` (mergecli's collect(), as the stage runs it) on a LLaMA
   with Llama-2-7B's layer shapes (hidden 4096, MLP 11008, 32 heads, vocab 32,000; fp32 as the
   stage loads it; random weights) with 1, 2 and 4 decoder blocks, 64 windows of 512 tokens,
   batch 8: peak allocated and reserved bytes per depth. A peak that does not grow with the
   depth is the peak of a 32-block 7B model, to set against the "7B fine-tunes on a 16 GB GPU"
   claim.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}

MEMORY = r"""
import json, sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
from mergecli.engine.calibration import Windows
from mergecli.engine.collect import collect_blocks, find_block_groups
from mergecli.engine.streamed import StreamedModel, model_weights
layers, samples, seq_len, batch = map(int, sys.argv[1:5])
torch.manual_seed(0)
config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
model = LlamaForCausalLM(config).eval()
ids = torch.randint(0, 32000, (samples, seq_len), generator=torch.Generator().manual_seed(1))
windows = Windows(ids, torch.ones_like(ids))
runner, weights = StreamedModel(config, device="cuda"), model_weights(model)
groups, dims = find_block_groups(runner, weights, ids)
torch.cuda.reset_peak_memory_stats()
stats = collect_blocks(runner, weights, windows, groups, dims, batch)
h_bytes = sum(h.numel() * 4 for h in stats.sums.values())
print(json.dumps({"layers": layers, "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
                  "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
                  "h_gib_per_layer": h_bytes / layers / 2**30,
                  "h_on_device_after": any(h.is_cuda for h in stats.sums.values())}))
"""


def nccl_path(work: Path, device: str) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import fine_tune, make_llama, make_lora, write_recipe

    make_llama(work / "base", seed=0)
    fine_tune(work / "base", work / "ft_a", seed=1)
    fine_tune(work / "base", work / "ft_b", seed=2)
    make_lora(work / "base", work / "lora_c", seed=3)
    text = [f"def f{i}(x):\n    return x * {i} + {i + 1}\n" for i in range(80)]
    (work / "code.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in text))
    recipe = write_recipe(work / "r.yaml", str(work / "base"), [
        {"name": n, "model": str(work / m), "dataset": {"path": "./code.jsonl"}}
        for n, m in (("a", "ft_a"), ("b", "ft_b"), ("c", "lora_c"))],
        [{"name": "ties", "method": "ties"}, {"name": "dare", "method": "dare_ties", "seed": 3},
         {"name": "sg", "method": "ties", "score": "sparsegpt", "compensate": True},
         {"name": "regmean", "method": "regmean"}],
        calibration={"samples": 6, "seq_len": 16, "batch_size": 2}, evaluation={"samples": 4, "seq_len": 16})
    runs = {}
    for name, prefix in (("alone", [sys.executable, "-m", "mergecli"]),
                         ("torchrun", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                       "--nproc-per-node=1", "-m", "mergecli"])):
        done = subprocess.run(prefix + ["--json", "--device", device, "compare", str(recipe), f"workspace=ws_{name}",
                                        f"output_dir=out_{name}"], capture_output=True, text=True, env=ENV, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
        runs[name] = {"rows": json.loads(done.stdout), "stderr": done.stderr}
    verbose = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
                              "-m", "mergecli", "--device", device, "hessian", str(recipe), "workspace=ws_torchrun"],
                             capture_output=True, text=True, env=ENV, timeout=600)
    backend = "nccl" if device == "cuda" else "gloo"
    return {f"backend_{backend}_logged": f"backend {backend}" in verbose.stderr,
            "hessians_equal": _hessians_equal(work / "ws_alone", work / "ws_torchrun"),
            "merges_bit_identical": {m: _same(work / "out_alone" / m, work / "out_torchrun" / m)
                                     for m in ("ties", "dare", "sg", "regmean")},
            "perplexities_equal": all(abs(x[k] - y[k]) <= 1e-6 * abs(x[k])
                                      for x, y in zip(runs["alone"]["rows"], runs["torchrun"]["rows"])
                                      for k in x if k.startswith("ppl_"))}


def _hessians_equal(a: Path, b: Path) -> dict:
    from safetensors.torch import load_file

    from mergecli.store.workspace import Workspace

    def sets(ws: Path) -> dict:
        return {x.label: (load_file(x.path / "hessian.safetensors"), json.loads((x.path / "hessian.json").read_text()))
                for x in Workspace(ws).artifacts() if x.kind == "hessian"}

    left, right = sets(a), sets(b)
    worst = max(float((right[label][0][g] - h).abs().max() / h.abs().max())
                for label, (sums, _) in left.items() for g, h in sums.items())
    return {"counts_equal": all(left[k][1]["counts"] == right[k][1]["counts"] for k in left),
            "max_relative_difference": worst, "bit_identical": worst == 0.0}


def _same(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    left = {k: v for f in a.glob("*.safetensors") for k, v in load_file(f).items()}
    right = {k: v for f in b.glob("*.safetensors") for k, v in load_file(f).items()}
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


def memory(layers: int) -> dict:
    done = subprocess.run([sys.executable, "-c", MEMORY, str(layers), "64", "512", "8"], capture_output=True,
                          text=True, env=ENV, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("gpu-distributed.json"))
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    import torch

    gpu = args.device == "cuda"
    results: dict = {"device": torch.cuda.get_device_name(0) if gpu else "cpu", "torch": torch.__version__}
    work = Path(tempfile.mkdtemp(prefix="mergecli-gpu-"))
    try:
        results["launch_path"] = nccl_path(work, args.device)
        print(json.dumps(results["launch_path"]), flush=True)
        if gpu:
            results["layer_by_layer_memory"] = [memory(n) for n in (1, 2, 4)]
            print(json.dumps(results["layer_by_layer_memory"]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
