"""Real sizes (issue #25): the data-aware path at Llama-2-7B's widths, memory against depth.

    python benchmarks/bench_scale.py --layers 2 4 --work /tmp/scale --out benchmarks/scale-results.json
    python benchmarks/bench_scale.py --config tiny --layers 2 4 --work /tmp/scale-tiny      # CI: a few minutes

Synthetic models with Llama-2-7B's widths (hidden 4096, MLP 11,008, 32 heads, vocabulary 32,000) and
2, 4 (8 where the disk allows) decoder layers, stored in bfloat16 like the real checkpoint; three
full fine-tunes, each the base plus a rank-8 change and noise on every tensor (written tensor by
tensor: no model is ever held); a small calibration (--windows x --seq-len tokens per fine-tune:
memory is what this measures). For each depth, each stage runs in its own process
(`python -m mergecli`, so its peak RSS is its own): `taskvec`, `hessian` (layer by layer),
`merge` of `ties` with SparseGPT scores, `regmean`, and `regmean` with `lambda: learned` (held to
`calibration.general`, a fourth small text); wall time, peak RSS (VmHWM: it counts the pages of the
memory-mapped checkpoints the stage read, which the kernel may drop and which grow with the files),
peak anonymous memory (sampled every 50 ms: what the stage allocated) and the workspace's disk use.

Reported: per stage and depth the numbers, the slope per layer (least squares over the depths
measured) and the extrapolation to 32 layers (a real 7B) -- an extrapolation, said as such: the
parts that do not grow with depth (embeddings, the output layer: 2 x 131 M parameters) are in the
intercept; the hidden states at block boundaries, which do, are tiny at this calibration. Time is
reported per window as well (the hessian stage and the learned merge's passes scale with the
windows; the merges' solves do not).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONFIGS = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
               vocab_size=32000),
    "tiny": dict(hidden_size=256, intermediate_size=688, num_attention_heads=4, num_key_value_heads=4,
                 vocab_size=2000),
}
MERGES = {
    "ties-sparsegpt": {"method": "ties", "score": "sparsegpt", "density": 0.2},
    "regmean": {"method": "regmean"},
    "regmean-learned": {"method": "regmean", "lambda": "learned"},
}
FINETUNES = ("alpha", "beta", "gamma")
WORDS = ("river stone light garden market paper music number silver window engine forest letter ocean "
         "harbor winter signal planet motion circle").split()

def texts(seed: int, documents: int = 60) -> list[str]:
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) + str(rng.randrange(100)) for _ in range(rng.randrange(40, 120)))
            for _ in range(documents)]


def build(folder: Path, widths: dict, layers: int) -> None:
    """base/ and one folder per fine-tune, bf16 safetensors, each tensor generated and written alone."""
    import torch
    from transformers import LlamaConfig, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from mergecli.models.safetensors_io import TensorInfo

    if (folder / "done").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(num_hidden_layers=layers, max_position_embeddings=512, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2, pad_token_id=3, dtype="bfloat16", **widths)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([t for s in range(5) for t in texts(s)],
                            trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>", "<pad>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>")
    shapes = {"model.embed_tokens.weight": (config.vocab_size, config.hidden_size),
              "model.norm.weight": (config.hidden_size,), "lm_head.weight": (config.vocab_size, config.hidden_size)}
    h, m = config.hidden_size, config.intermediate_size
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       **{p + f"self_attn.{n}_proj.weight": (h, h) for n in "qkvo"},
                       p + "mlp.gate_proj.weight": (m, h), p + "mlp.up_proj.weight": (m, h),
                       p + "mlp.down_proj.weight": (h, m)})
    infos = [TensorInfo(n, s, torch.bfloat16) for n, s in shapes.items()]
    for k, name in enumerate((*FINETUNES, "general")):
        (folder / f"{name}.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts(10 + k)))
    write_model(folder / "base", config, tokenizer, infos, lambda info, number: base_tensor(info, number))
    for index, name in enumerate(FINETUNES, start=1):
        step = output_step(folder, name, tokenizer)
        write_model(folder / name, config, tokenizer, infos,
                    lambda info, number, index=index: base_tensor(info, number) + change(info, number, index, step))
    (folder / "done").write_text("")


def base_tensor(info, number: int):
    import torch

    if info.name.endswith("norm.weight"):
        return torch.ones(info.shape)
    return torch.randn(info.shape, generator=torch.Generator().manual_seed(number)) * 0.02


def change(info, number: int, index: int, step: dict):
    """A fine-tune's change of one tensor: a rank-8 change and noise everywhere, plus, on the output
    layer, a step down the gradient of its domain's loss (so that it beats the base there, as a
    fine-tune does: `lambda: learned` scores only fine-tunes that do)."""
    import torch

    g = torch.Generator().manual_seed(1000 * index + number)
    delta = torch.randn(info.shape, generator=g) * 0.001
    if len(info.shape) == 2:
        u, v = torch.randn(info.shape[0], 8, generator=g), torch.randn(8, info.shape[1], generator=g)
        delta += u @ v * (0.002 / 8 ** 0.5)
    return delta + step.get(info.name, 0.0)


def output_step(folder: Path, name: str, tokenizer) -> dict:
    """-0.05 |W| g / |g| for the output layer W, with g the gradient of the base's mean NLL on 8
    windows of the domain's text, computed block by block (the base never loaded)."""
    from mergecli.engine.calibration import make_windows
    from mergecli.engine.streamed import StreamedModel
    from mergecli.models.safetensors_io import Checkpoint

    runner = StreamedModel.from_folder(folder / "base")
    weights = runner.checkpoint_weights(Checkpoint.open(folder / "base"))
    windows = make_windows([json.loads(line)["text"] for line in open(folder / f"{name}.jsonl")], tokenizer, 8, 64,
                           seed=0)
    found: dict = {}

    def on_grad(tensor: str, grad) -> None:
        if tensor == "lm_head.weight":
            w = weights([tensor])[tensor].float()
            found[tensor] = -0.05 * w.norm() * grad / grad.norm()
    runner.gradients(weights, list(windows.batches(4)), on_grad)
    return found


def write_model(out: Path, config, tokenizer, infos, tensor_of) -> None:
    """A model folder written one tensor at a time (bf16), never held whole."""
    import torch

    from mergecli.models.safetensors_io import StreamingWriter

    out.mkdir(exist_ok=True)
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    with StreamingWriter(out / "model.safetensors", infos, {"format": "pt"}) as writer:
        for number, info in enumerate(infos):
            writer.write(info.name, tensor_of(info, number).to(torch.bfloat16))


def recipe(folder: Path, windows: int, seq_len: int) -> Path:
    data = {"name": f"scale-{folder.name}", "base": "./base", "workspace": "./ws", "output_dir": "./merged",
            "models": [{"name": n, "model": f"./{n}", "dataset": {"path": f"./{n}.jsonl"}} for n in FINETUNES],
            "merges": [{"name": name, **spec} for name, spec in MERGES.items()],
            "calibration": {"samples": windows, "seq_len": seq_len, "batch_size": 2, "layer_by_layer": True,
                            "general": {"path": "./general.jsonl"}}}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run(path: Path, *args: str) -> dict:
    """One mergecli command in a process of its own: wall time, that process's peak RSS, and the
    peak of its anonymous memory (what it allocated, without the checkpoint pages it mapped)."""
    # VmHWM: the peak of this program's own memory (ru_maxrss would count the parent's pages at fork).
    # It includes file pages of the memory-mapped checkpoints, which the kernel can drop at will and
    # which grow with the files read; RssAnon, sampled every 50 ms, is what the process needs.
    probe = ("import re, runpy, sys, threading, time\n"
             "anon = [0]\n"
             "def watch():\n"
             "    while True:\n"
             "        found = re.search(r'RssAnon:\\s+(\\d+)', open('/proc/self/status').read())\n"
             "        anon[0] = max(anon[0], int(found.group(1)))\n"
             "        time.sleep(0.05)\n"
             "threading.Thread(target=watch, daemon=True).start()\n"
             "sys.argv = ['mergecli', *sys.argv[1:]]\n"
             "try:\n    runpy.run_module('mergecli', run_name='__main__')\n"
             "finally:\n    print('PEAK', re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1),"
             " anon[0], file=sys.stderr)")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", probe, "-q", *args, str(path)], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    seconds = time.perf_counter() - start
    peak = [line for line in done.stderr.splitlines() if line.startswith("PEAK")]
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
    rss, anon = (int(v) / 2**20 for v in peak[-1].split()[1:3])
    return {"seconds": round(seconds, 1), "peak_rss_gib": round(rss, 3), "peak_anon_gib": round(anon, 3)}


def watch_anon(every: float = 0.05) -> list[int]:
    """This process's peak RssAnon in kB so far (`[peak]`, kept up to date by a daemon thread): what
    it allocated, without the pages of the checkpoints it maps (`run` samples a child the same way)."""
    import re
    import threading

    peak = [0]

    def watch() -> None:
        while True:
            found = re.search(r"RssAnon:\s+(\d+)", open("/proc/self/status").read())
            peak[0] = max(peak[0], int(found.group(1)))
            time.sleep(every)

    threading.Thread(target=watch, daemon=True).start()
    return peak


def folder_gib(path: Path) -> float:
    return round(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**30, 3)


def fit(depths: list[int], values: list[float]) -> tuple[float, float]:
    """Least-squares intercept and slope per layer (exact through two points)."""
    n = len(depths)
    mx, my = sum(depths) / n, sum(values) / n
    var = sum((x - mx) ** 2 for x in depths)
    slope = sum((x - mx) * (y - my) for x, y in zip(depths, values)) / var if var else 0.0
    return my - slope * mx, slope


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="7b")
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--merges", nargs="+", choices=list(MERGES), default=list(MERGES),
                        help="which merges to measure (default: all; each is minutes to an hour at 7B widths)")
    args = parser.parse_args()
    results: dict = {"config": args.config, "date": time.strftime("%Y-%m-%d", time.gmtime()),
                     "widths": CONFIGS[args.config], "windows": args.windows,
                     "seq_len": args.seq_len, "finetunes": len(FINETUNES), "depths": {}}
    stages = [("taskvec", ["taskvec"]), ("hessian", ["hessian"])] + [
        (name, ["merge", "--only", name]) for name in args.merges]
    for layers in args.layers:
        folder = args.work / f"{args.config}-{layers}"
        print(f"building {folder} ({layers} layers)", file=sys.stderr, flush=True)
        build(folder, CONFIGS[args.config], layers)
        path = recipe(folder, args.windows, args.seq_len)
        # a new config's architecture is read once (transformers' meta model, about 0.16 GB of imports)
        # and cached for every later run: read it here, so no stage's peak depends on going first
        subprocess.run([sys.executable, "-c", "import sys; from mergecli.models.architecture import describe; "
                        "describe(sys.argv[1])", str(folder / "base")], check=True, cwd=Path(__file__).parents[1])
        shutil.rmtree(folder / "ws", ignore_errors=True)  # this benchmark's own workspace: every stage measured cold
        shutil.rmtree(folder / "merged", ignore_errors=True)
        found = {}
        for name, command in stages:
            found[name] = run(path, *command)
            print(layers, name, found[name], file=sys.stderr, flush=True)
        found["disk_gib"] = {kind.name: folder_gib(kind) for kind in sorted((folder / "ws").iterdir()) if kind.is_dir()}
        found["disk_gib"]["models"] = folder_gib(folder / "base") * (1 + len(FINETUNES))
        results["depths"][layers] = found
    depths = sorted(results["depths"])
    if len(depths) > 1:
        results["per_layer"] = {}
        for name, _ in stages:
            for what in ("peak_rss_gib", "peak_anon_gib", "seconds"):
                intercept, slope = fit(depths, [results["depths"][d][name][what] for d in depths])
                results["per_layer"].setdefault(name, {})[what] = {
                    "slope": round(slope, 4), "at_32_layers_extrapolated": round(intercept + 32 * slope, 2),
                    "growth_first_to_last": round(results["depths"][depths[-1]][name][what]
                                                  / results["depths"][depths[0]][name][what] - 1, 3)}
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
