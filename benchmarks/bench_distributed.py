"""One process vs two under torchrun: wall time of `mergecli hessian` and `mergecli merge`.

    python benchmarks/bench_distributed.py --runs 3 --out benchmarks/distributed-results.json
    python benchmarks/bench_distributed.py --stages hessian --samples 64 --out benchmarks/distributed-hessian-64.json
    python benchmarks/bench_distributed.py --params 50M --samples 2 --seq-len 64 --runs 1   # CI smoke run

Every process runs with one torch thread (OMP_NUM_THREADS=1, what torchrun sets), so two processes
can use the two cores of this machine and one process one core. Each configuration is a whole
command: `python -m mergecli` alone, then `python -m torch.distributed.run --standalone
--nproc-per-node N -m mergecli` with N = 1 and 2; median wall time of --runs rounds, each round
running every configuration once (so all see the same drift of whatever else runs on the machine).
Each round starts by measuring how many cores two processes of ours get at that moment
(`free_cores`: a single-threaded matrix loop alone, then two at once): on a machine shared with
other work, a second process can only be as fast as the core it finds.

- hessian: a LLaMA with SmolLM2-135M's shapes (random weights, bf16 on disk: the cost does not
  depend on the values) and fine-tunes of it (base + noise), calibrated on Python's standard
  library source with a BPE tokenizer trained on it. One fine-tune (two processes split its
  windows and add up the sums) and two fine-tunes (one per process). A fresh workspace per run.
- merge: bench_merge.py's synthetic LLaMA (`--params`) and its three fine-tunes; ties,
  dare_ties and task_arithmetic with `--workers 1`, task vectors cached first, the merge rebuilt
  (`--overwrite`) per run. The merge's own seconds (rank 0's, waiting for the others included)
  are reported beside the command's; every configuration's output is checked to hold the same
  tensor bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Callable

import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from bench_merge import METHODS, build_models  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mergecli.store.workspace import Workspace  # noqa: E402

ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
CONFIGS = {  # name -> command up to the mergecli arguments
    "1 process": [sys.executable, "-m", "mergecli"],
    "torchrun, 1 process": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
                            "-m", "mergecli"],
    "torchrun, 2 processes": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                              "-m", "mergecli"],
}
SPIN = r"""
import time, torch
torch.set_num_threads(1)
a = torch.randn(512, 512)
start = time.perf_counter()
for _ in range(600):
    a = (a @ a).clamp_(-1, 1)
print(time.perf_counter() - start)
"""


def calibration_models(work: Path, count: int) -> tuple[Path, list[Path], Path]:
    """SmolLM2-135M-shaped base, `count` fine-tunes, and a jsonl of standard-library source."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    data = work / "stdlib.jsonl"
    if not data.is_file():
        files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
        texts = [f.read_text(errors="ignore") for f in files]
        data.write_text("\n".join(json.dumps({"text": t}) for t in texts if t.strip()))
    base = work / "smol-base"
    if not (base / "model.safetensors").is_file():
        texts = [json.loads(line)["text"] for line in data.read_text().splitlines()]
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=2048, special_tokens=["<unk>", "<s>", "</s>"]))
        PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                eos_token="</s>").save_pretrained(base)
        torch.manual_seed(0)
        config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                             num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
                             max_position_embeddings=2048, bos_token_id=1, eos_token_id=2)
        LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(base)
    fine_tunes = []
    for index in range(1, count + 1):
        folder = work / f"smol-ft{index}"
        fine_tunes.append(folder)
        if (folder / "model.safetensors").is_file():
            continue
        model = LlamaForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
        with torch.no_grad():
            gen = torch.Generator().manual_seed(index)
            for param in model.parameters():
                param.add_((torch.randn(param.shape, generator=gen) * 0.002).to(param.dtype))
        model.save_pretrained(folder)
    return base, fine_tunes, data


def run(config: str, args: list[str]) -> dict:
    """Wall seconds of one whole command and its `--json` result."""
    cmd = CONFIGS[config] + ["-q", "--json", *args]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **ENV})
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return {"seconds": seconds, "result": json.loads(done.stdout)}


def free_cores() -> float:
    """How many cores two processes of ours get right now: the same single-threaded matrix loop
    run alone, then twice at once; 2 x alone / together (2.0: two free cores, 1.0: one)."""
    def spin(n: int) -> list[float]:
        procs = [subprocess.Popen([sys.executable, "-c", SPIN], stdout=subprocess.PIPE, text=True) for _ in range(n)]
        return [float(p.communicate()[0]) for p in procs]

    return round(2 * spin(1)[0] / max(spin(2)), 2)


def rounds(count: int, command: Callable[[str], list[str]], before: Callable[[], None]) -> tuple[dict, list[float]]:
    """Every configuration once per round, `count` rounds, so all see the same drift of the
    machine's other load; the free cores measured at the start of each round."""
    runs: dict[str, list[dict]] = {config: [] for config in CONFIGS}
    cores = []
    for _ in range(count):
        cores.append(free_cores())
        for config in CONFIGS:
            before()
            runs[config].append(run(config, command(config)))
    return runs, cores


def median(values: list[float]) -> float:
    return round(statistics.median(values), 2)


def bench_hessian(args: argparse.Namespace) -> dict:
    base, fine_tunes, data = calibration_models(args.work, 2)
    ws = args.work / "ws-hessian"
    found = {}
    for count in (1, 2):
        recipe = args.work / f"hessian-{count}.yaml"
        recipe.write_text(yaml.safe_dump({
            "name": "bench", "base": str(base), "merges": [],
            "models": [{"name": f"ft{i + 1}", "model": str(f), "dataset": {"path": str(data)}}
                       for i, f in enumerate(fine_tunes[:count])],
            "calibration": {"samples": args.samples, "seq_len": args.seq_len, "batch_size": 4}}))
        runs, cores = rounds(args.runs, lambda config: ["hessian", str(recipe), f"workspace={ws}"],
                             lambda: Workspace(ws).collect(keep=set()))  # only what mergecli made there
        entry = {config: {"seconds": median([r["seconds"] for r in rs])} for config, rs in runs.items()}
        found[f"{count} fine-tune(s)"] = {**with_speed_ups(entry, ("seconds",)), "free cores per round": cores}
        print(f"hessian, {count} fine-tune(s): {found[f'{count} fine-tune(s)']}", flush=True)
    return found


def bench_merge(args: argparse.Namespace) -> dict:
    folders = build_models(args.work, args.params)
    ws = args.work / "ws-merge"
    found = {}
    for method in args.methods:
        recipe = args.work / f"dist-{method}.yaml"
        recipe.write_text(yaml.safe_dump({
            "name": "bench", "base": str(folders[0]), "models": [{"model": str(f)} for f in folders[1:]],
            "merges": [{"name": method, **METHODS[method]["mergecli"]}], "workspace": str(ws),
            "shard_size": "500MB"}))
        run("1 process", ["taskvec", str(recipe)])

        def out(config: str) -> Path:
            return args.work / f"out-{config.replace(' ', '').replace(',', '-')}"

        runs, cores = rounds(args.runs, lambda config: ["merge", str(recipe), f"output_dir={out(config)}",
                                                        "--workers", "1", "--overwrite"], lambda: None)
        entry: dict = {config: {"seconds": median([r["seconds"] for r in rs]),
                                "merge_seconds": median([r["result"][0]["seconds"] for r in rs])}
                       for config, rs in runs.items()}
        found[method] = {**with_speed_ups(entry, ("seconds", "merge_seconds")), "free cores per round": cores,
                         "same tensors in every configuration": same_tensors([out(c) / method for c in CONFIGS])}
        print(f"merge {method}: {found[method]}", flush=True)
    return found


def with_speed_ups(entry: dict, keys: tuple[str, ...]) -> dict:
    """Each measure of one process divided by the same measure of two (under torchrun)."""
    return {**entry, "speed-up (1 process / torchrun, 2 processes)": {
        k: round(entry["1 process"][k] / entry["torchrun, 2 processes"][k], 2) for k in keys}}


def same_tensors(folders: list[Path]) -> bool:
    from safetensors import safe_open

    def tensors(folder: Path) -> dict[str, bytes]:
        found = {}
        for file in sorted(folder.glob("*.safetensors")):
            with safe_open(str(file), "pt") as f:
                for name in f.keys():
                    found[name] = f.get_tensor(name).view(torch.uint8).numpy().tobytes()
        return found

    reference = tensors(folders[0])
    return all(tensors(f) == reference for f in folders[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", choices=["50M", "500M"], default="500M")
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("/tmp/mergecli-bench"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/distributed-results.json"))
    parser.add_argument("--stages", nargs="*", choices=["hessian", "merge"], default=["hessian", "merge"])
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    results = {"cores": os.cpu_count(), "threads per process": 1, "runs": args.runs,
               "hessian_tokens_per_fine_tune": args.samples * args.seq_len, "merge_params": args.params,
               "load_average_before": os.getloadavg()}
    for stage, bench in (("hessian", bench_hessian), ("merge", bench_merge)):
        if stage in args.stages:
            results[stage] = bench(args)
    results["load_average_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
