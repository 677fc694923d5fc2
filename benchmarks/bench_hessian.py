"""Hessian stage cost versus a plain forward pass over the same tokens.

    python benchmarks/bench_hessian.py --samples 16 --seq-len 256 --out benchmarks/hessian-results.json
    python benchmarks/bench_hessian.py --device cuda --samples 256 --seq-len 512 --out hessian-gpu.json

A LLaMA model with SmolLM2-135M's shapes (hidden 576, MLP 1536, 30 layers, 9/3 GQA heads, vocab
49,152; random weights: the cost does not depend on the values) runs the same windows three ways,
each in its own process so peak RSS is its own: a plain forward, mergecli's hook collection on the
whole model, and the block-streamed runner (layer by layer; the model's own tensors handed to it). Median wall time of --runs, overhead ratios, JSON out.
On a GPU, one untimed batch warms the kernels up first, and the timer waits for the device.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, resource, sys, time, torch
from transformers import LlamaConfig, LlamaForCausalLM
from mergecli.engine.calibration import Windows
from mergecli.engine.collect import collect, collect_blocks, find_block_groups, find_groups
from mergecli.engine.streamed import StreamedModel, model_weights
mode, samples, seq_len, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
device = torch.device(sys.argv[5])
torch.manual_seed(0)
config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                     num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)
model = LlamaForCausalLM(config).eval()
ids = torch.randint(0, 49152, (samples, seq_len), generator=torch.Generator().manual_seed(1))
windows = Windows(ids, torch.ones_like(ids))
groups = find_groups(model, ids)
model.to(device)


def run(windows):
    if mode == "forward":
        with torch.no_grad():
            for x, m in windows.batches(batch):
                model(input_ids=x.to(device), attention_mask=m.to(device), use_cache=False)
    elif mode == "layer_by_layer":
        runner, weights = StreamedModel(config, device=device), model_weights(model)
        collect_blocks(runner, weights, windows, groups, find_block_groups(runner, weights, ids)[1], batch)
    else:
        collect(model, windows, groups, batch, device)
    if device.type == "cuda":
        torch.cuda.synchronize()


if device.type == "cuda":
    run(Windows(ids[:batch], torch.ones_like(ids[:batch])))
start = time.perf_counter()
run(windows)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/hessian-results.json"))
    args = parser.parse_args()
    results = {"tokens": args.samples * args.seq_len, "runs": args.runs, "device": args.device}
    for mode in ("forward", "whole_model", "layer_by_layer"):
        runs = []
        for _ in range(args.runs):
            out = subprocess.run([sys.executable, "-c", CHILD, mode, str(args.samples), str(args.seq_len),
                                  str(args.batch_size), args.device], capture_output=True, text=True, check=True)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        results[mode] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(mode, results[mode], flush=True)
    for mode in ("whole_model", "layer_by_layer"):
        results[f"{mode}_vs_forward_seconds"] = round(results[mode]["seconds"] / results["forward"]["seconds"], 3)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
