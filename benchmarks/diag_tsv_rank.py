"""Diagnostic (issue #26): how much of each fine-tune's task matrices TSV-M keeps.

TSV-M keeps the top k = min(m, n) / T singular directions of every task matrix (T fine-tunes). This
prints, per fine-tune, the share of ||tau||_F^2 in them for T = 3 and 4, over every 2-D weight of
the decoder's linear layers (embeddings and the output layer excluded), and the overlap of two
fine-tunes' kept left bases at T = 4 (mean squared cosine, ||U_i^T U_j||_F^2 / k) beside its value
for random subspaces (k / m for m rows): what TSV-M truncates against what it decorrelates.

    python benchmarks/diag_tsv_rank.py BASE_FOLDER FINETUNE_FOLDER...   (single-file safetensors)
"""

import sys
from pathlib import Path

import torch
from safetensors import safe_open

COUNTS = (3, 4)


def main() -> None:
    base, *fine_tunes = (Path(arg) for arg in sys.argv[1:])
    opened = [safe_open(str(folder / "model.safetensors"), framework="pt") for folder in (base, *fine_tunes)]
    reference, tuned = opened[0], opened[1:]
    names = [n for n in reference.keys() if n.endswith(".weight") and len(reference.get_slice(n).get_shape()) == 2
             and "embed" not in n and "lm_head" not in n]
    total = {f.name: 0.0 for f in fine_tunes}
    kept = {count: dict.fromkeys(total, 0.0) for count in COUNTS}
    overlap: dict[tuple[str, str], list[float]] = {}
    chance = []
    for name in names:
        weight = reference.get_tensor(name).float()
        bases = {}
        for folder, handle in zip(fine_tunes, tuned):
            u, s, _ = torch.linalg.svd(handle.get_tensor(name).float() - weight, full_matrices=False)
            energy = s.square()
            total[folder.name] += float(energy.sum())
            for count in COUNTS:
                kept[count][folder.name] += float(energy[: len(s) // count].sum())
            bases[folder.name] = u[:, : len(s) // max(COUNTS)]
        chance.append(bases[fine_tunes[0].name].shape[1] / weight.shape[0])
        for a in bases:
            for b in bases:
                if a < b:
                    cosines = (bases[a].T @ bases[b]).square().sum() / bases[a].shape[1]
                    overlap.setdefault((a, b), []).append(float(cosines))
    print(f"{len(names)} matrices; random subspaces' overlap {sum(chance) / len(chance):.3f}")
    for folder in fine_tunes:
        print(folder.name, {f"T={c}": round(kept[c][folder.name] / total[folder.name], 3) for c in COUNTS})
    for (a, b), values in sorted(overlap.items()):
        print(a, b, round(sum(values) / len(values), 3))


if __name__ == "__main__":
    main()
