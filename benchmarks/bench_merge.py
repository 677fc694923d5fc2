"""Merge benchmark: mergecli vs mergekit 0.1.5 vs the I/O floor, on a synthetic LLaMA model.

    python benchmarks/bench_merge.py --params 500M --runs 3 --out benchmarks/results.json
    python benchmarks/bench_merge.py --params 50M --runs 1 --skip-mergekit     # the CI smoke run

1. Writes a synthetic LLaMA-architecture base (bf16, sharded safetensors) and 3 fine-tunes (base +
   rank-8 updates + sparse noise) under --work.
2. The I/O floor: read every input tensor once (safe_open) and write one model-sized output.
3. `mergecli merge` for ties (magnitude, density 0.2), dare_ties (density 0.2) and task_arithmetic,
   each run in a fresh workspace (task vectors included: "cold") and again with the task vectors
   cached ("warm"); the same merges with mergekit 0.1.5 (`mergekit-yaml`, in its own virtual
   environment created by this script with access to the installed torch).
4. Wall time and peak RSS of every command from `/usr/bin/time -v`, median over --runs; ratios.

Semantic differences, noted in the results: mergekit's TIES/DARE density applies per tensor with
its own `normalize` (weighted mean of agreeing models, like ours) and its DARE rescales by 1/density
(`rescale: true`, like ours); mergekit keeps k = int(d * n) by magnitude per tensor.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

METHODS = {
    "ties": {"mergecli": {"method": "ties", "density": 0.2}, "mergekit": ("ties", {"density": 0.2, "weight": 1.0})},
    "dare_ties": {"mergecli": {"method": "dare_ties", "density": 0.2, "seed": 0},
                  "mergekit": ("dare_ties", {"density": 0.2, "weight": 1.0})},
    "task_arithmetic": {"mergecli": {"method": "task_arithmetic"}, "mergekit": ("task_arithmetic", {"weight": 1.0})},
}
SIZES = {  # hidden, intermediate, layers, vocab
    "50M": (512, 1408, 8, 32000),
    "500M": (1024, 2816, 32, 32000),
}


def build_models(work: Path, size: str, layers: int | None = None) -> list[Path]:
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, default_layers, vocab = SIZES[size]
    tag = size if layers is None else f"{size}-{layers}L"
    layers = layers or default_layers
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, vocab_size=vocab,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         tie_word_embeddings=False, dtype="bfloat16", architectures=["LlamaForCausalLM"])
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in LlamaForCausalLM(config).named_parameters()}
    folders = []
    for index, name in enumerate(["base", "ft1", "ft2", "ft3"]):
        folder = work / f"{tag}-{name}"
        folders.append(folder)
        if (folder / "model.safetensors.index.json").is_file():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(folder)
        weight_map, shard, shard_bytes, shard_no = {}, {}, 0, 0
        names = list(shapes)

        def flush():
            nonlocal shard, shard_bytes, shard_no
            if shard:
                shard_no += 1
                file = f"model-{shard_no:05d}.safetensors"
                save_file(shard, folder / file, metadata={"format": "pt"})
                weight_map.update({k: file for k in shard})
                shard, shard_bytes = {}, 0

        for i, tensor_name in enumerate(names):
            g = torch.Generator().manual_seed(i)  # the base is the same in every model
            theta = torch.randn(shapes[tensor_name], generator=g) * 0.02
            if index:
                g2 = torch.Generator().manual_seed(1000 * index + i)
                if theta.dim() == 2:
                    a = torch.randn(theta.shape[0], 8, generator=g2) * 0.01
                    b = torch.randn(8, theta.shape[1], generator=g2) * 0.01
                    theta += a @ b
                theta += torch.randn(theta.shape, generator=g2) * 0.002 * (torch.rand(theta.shape, generator=g2) < 0.1)
            shard[tensor_name] = theta.to(torch.bfloat16)
            shard_bytes += shard[tensor_name].numel() * 2
            if shard_bytes > 500 * 2**20:
                flush()
        flush()
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folders


def timed(cmd: list[str], env: dict | None = None) -> dict:
    """Wall seconds and peak RSS (MiB) of one command, from GNU time."""
    done = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1)) / 1024
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", done.stderr).group(1)
    seconds = sum(float(x) * 60 ** i for i, x in enumerate(reversed(wall.split(":"))))
    return {"seconds": seconds, "peak_rss_mib": rss}


FLOOR = """
import sys, json, torch
from pathlib import Path
from safetensors import safe_open
from safetensors.torch import save_file
folders, out = [Path(p) for p in sys.argv[1:-1]], Path(sys.argv[-1])
out.mkdir(parents=True, exist_ok=True)
index = json.loads((folders[0] / "model.safetensors.index.json").read_text())["weight_map"]
by_file = {}
for name, file in index.items():
    by_file.setdefault(file, []).append(name)
for file, names in by_file.items():
    shard = {}
    for name in names:
        for folder in folders:
            with safe_open(str(folder / file), "pt") as f:
                t = f.get_tensor(name)
        shard[name] = t
    save_file(shard, out / file, metadata={"format": "pt"})
"""


def median(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", choices=list(SIZES), default="500M")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("/tmp/mergecli-bench"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results.json"))
    parser.add_argument("--skip-mergekit", action="store_true")
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--layers", type=int, help="override the depth (same widths): peak RSS must not grow with it")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    start = time.time()
    folders = build_models(args.work, args.params, args.layers)
    print(f"models ready in {time.time() - start:.0f} s: {', '.join(map(str, folders))}", flush=True)
    results: dict = {"params": args.params, "layers": args.layers or SIZES[args.params][2], "runs": args.runs, "machine": {"cores": os.cpu_count()},
                     "torch_threads": torch.get_num_threads(), "floor": None, "methods": {}}
    floor_runs = []
    for _ in range(args.runs):
        shutil.rmtree(args.work / "floor-out", ignore_errors=True)
        floor_runs.append(timed([sys.executable, "-c", FLOOR, *map(str, folders), str(args.work / "floor-out")]))
    results["floor"] = median(floor_runs)
    print("I/O floor:", results["floor"], flush=True)
    mergekit = None if args.skip_mergekit else ensure_mergekit(args.work)
    for method in args.methods:
        spec = METHODS[method]
        entry: dict = {}
        recipe = args.work / f"recipe-{method}.yaml"
        recipe.write_text(yaml.safe_dump({
            "name": "bench", "base": str(folders[0]), "models": [{"model": str(f)} for f in folders[1:]],
            "merges": [{"name": method, **spec["mergecli"]}], "workspace": str(args.work / "ws"),
            "output_dir": str(args.work / "out-mergecli"), "shard_size": "500MB"}))
        cold, warm = [], []
        for _ in range(args.runs):
            shutil.rmtree(args.work / "ws", ignore_errors=True)
            shutil.rmtree(args.work / "out-mergecli", ignore_errors=True)
            cold.append(timed(["mergecli", "-q", "merge", str(recipe)]))
            shutil.rmtree(args.work / "out-mergecli", ignore_errors=True)
            warm.append(timed(["mergecli", "-q", "merge", str(recipe)]))
        entry["mergecli_cold"], entry["mergecli_warm"] = median(cold), median(warm)
        entry["output_loads"] = loads(args.work / "out-mergecli" / method)
        if mergekit:
            name, params = spec["mergekit"]
            config = args.work / f"mergekit-{method}.yaml"
            config.write_text(yaml.safe_dump({
                "merge_method": name, "base_model": str(folders[0]), "dtype": "bfloat16",
                "parameters": {"normalize": True} if "ties" in name else {},
                "models": [{"model": str(f), "parameters": dict(params)} for f in folders[1:]]}))
            runs = []
            for _ in range(args.runs):
                shutil.rmtree(args.work / "out-mergekit", ignore_errors=True)
                runs.append(timed([str(mergekit), str(config), str(args.work / "out-mergekit"),
                                   "--out-shard-size", "500M", "--lazy-unpickle"]))
            entry["mergekit"] = median(runs)
            for kind in ("mergecli_cold", "mergecli_warm"):
                entry[f"{kind}_vs_mergekit"] = {k: round(entry[kind][k] / entry["mergekit"][k], 3)
                                                 for k in ("seconds", "peak_rss_mib")}
        for kind in ("mergecli_cold", "mergecli_warm"):
            entry[f"{kind}_vs_floor_seconds"] = round(entry[kind]["seconds"] / results["floor"]["seconds"], 3)
        results["methods"][method] = entry
        print(method, json.dumps(entry), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


def loads(folder: Path) -> bool:
    """The merged folder loads with transformers and gives finite logits."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits
    return bool(torch.isfinite(logits).all())


def ensure_mergekit(work: Path) -> Path:
    """mergekit 0.1.5 in its own venv that sees this interpreter's packages (torch stays the CPU one)."""
    venv = work / "mergekit-venv"
    exe = venv / "bin" / "mergekit-yaml"
    if not exe.exists():
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", "mergekit==0.1.5"], check=True)
    return exe


if __name__ == "__main__":
    main()
