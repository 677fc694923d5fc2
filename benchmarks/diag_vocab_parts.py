"""Memory of one vocabulary tensor's RegMean parts (the merges `lambda: learned` scores), alone.

    python benchmarks/diag_vocab_parts.py                 # 32,000 x 4,096 (Llama-2-7B), three fine-tunes
    python benchmarks/diag_vocab_parts.py --rows 2000 --cols 256 --out parts.pt

The input embedding of a 7B model, bf16 base and fine-tunes, each fine-tune's token frequencies as
its statistics: `merge_parts` computes the three one-fine-tune parts at once, as the parts writer
calls it, on one thread. Prints the anonymous memory before and at its peak (RssAnon, sampled
every 20 ms) and the time; `--out` saves the parts, to compare two versions' bits.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_scale import watch_anon  # noqa: E402 - beside this script


def main() -> None:
    import torch

    from mergecli.engine.hessians import TokenCounts
    from mergecli.methods.pipeline import TaskTensor, TensorPlan, merge_parts
    from mergecli.methods.table import catalog

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=32000)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    anon = watch_anon(0.02)
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(args.rows, args.cols, generator=generator).to(torch.bfloat16)
    tunes = [(base.float() + 0.01 * torch.randn(args.rows, args.cols, generator=generator)).to(torch.bfloat16)
             for _ in range(3)]
    stats = [TokenCounts(torch.rand(args.rows, generator=generator, dtype=torch.float64)) for _ in range(3)]
    plan = TensorPlan(catalog()["regmean"], [1.0, 1.0, 1.0], {}, "model.embed_tokens.weight", False, False, None,
                      None, torch.float32, False)
    time.sleep(0.2)
    before = anon[0]
    start = time.perf_counter()
    parts, _, _ = merge_parts(plan, [[float(i == j) for j in range(3)] for i in range(3)],
                              [TaskTensor(t, base) for t in tunes], stats, base=base)
    seconds = time.perf_counter() - start
    if args.out:
        torch.save(parts, args.out)
    print(f"inputs {before / 2**20:.2f} GiB, peak {anon[0] / 2**20:.2f} GiB, the parts' merge "
          f"{(anon[0] - before) / 2**20:.2f} GiB more, {seconds:.1f} s")


if __name__ == "__main__":
    main()
