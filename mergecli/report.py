"""The comparison table: rows = models, columns = perplexity per dataset, mean, change vs the
fine-tunes on their own domains, density kept, merge time; exported as json/csv/markdown and a
grouped bar chart."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Sequence

from .stages.evaluate import Evaluated


def comparison(results: Sequence[Evaluated]) -> list[dict[str, Any]]:
    """One dict per model; `vs_own_finetune` is the mean relative change, over the datasets that
    belong to a fine-tune, of this model's perplexity against that fine-tune's own."""
    own = {r.model: r.perplexity[r.model] for r in results if r.role == "finetune" and r.model in r.perplexity}
    merges = [r for r in results if r.role == "merge"]
    best = min(merges, key=lambda r: r.mean).model if merges else None
    rows = []
    for r in results:
        changes = [r.perplexity[d] / ref - 1 for d, ref in own.items() if d in r.perplexity]
        rows.append({
            "model": r.model, "role": r.role, **{f"ppl_{d}": round(v, 4) for d, v in r.perplexity.items()},
            "ppl_mean": round(r.mean, 4), **{k: round(v, 4) for k, v in r.scores.items()},
            "vs_own_finetune": round(sum(changes) / len(changes), 4) if changes else None,
            "kept_density": round(r.merge["kept_density"], 4) if r.merge else None,
            "merge_seconds": r.merge["seconds"] if r.merge else None,
            "method": _method(r.merge) if r.merge else None,
            "best": r.model == best,
        })
    return rows


def render(rows: list[dict[str, Any]], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(rows, indent=2)
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        return buffer.getvalue()
    if fmt == "markdown":
        header = list(rows[0])
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join("" if row[h] is None else str(row[h]) for h in header) + " |" for row in rows]
        return "\n".join(lines) + "\n"
    raise ValueError(f"unknown format {fmt!r}")


def plot(results: Sequence[Evaluated], path: Path):
    """Grouped bars: one group per dataset, one bar per model, log-scaled perplexity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(results[0].perplexity)
    width = 0.8 / len(results)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(datasets) * len(results) / 3), 4.5))
    for i, r in enumerate(results):
        xs = [d + (i - (len(results) - 1) / 2) * width for d in range(len(datasets))]
        ax.bar(xs, [r.perplexity[d] for d in datasets], width, label=f"{r.model} ({r.role})")
    ax.set_xticks(range(len(datasets)), datasets)
    ax.set_xlabel("evaluation dataset (held-out text)")
    ax.set_ylabel("perplexity (log scale, lower is better)")
    ax.set_yscale("log")
    ax.set_title("mergecli compare")
    ax.legend(fontsize="small", ncol=2, bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return fig


def _method(merge: dict) -> str:
    """method/score, the score only where it selected something (density < 1)."""
    return merge["method"] + (f"/{merge['score']}" if merge.get("score") and merge["density"] < 1 else "")
