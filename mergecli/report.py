"""The comparison table: rows = models, columns = perplexity per dataset, mean, how much of each
specialist's gain a model keeps, density kept, merge time; exported as json/csv/markdown and a
grouped bar chart."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .card import setting_text

if TYPE_CHECKING:
    from .stages.evaluate import Evaluated


def comparison(results: Sequence["Evaluated"]) -> list[dict[str, Any]]:
    """One dict per model.

    `vs_own_finetune`: the mean relative change, over the datasets that belong to a fine-tune, of
    this model's perplexity against that fine-tune's own. `gain_retained`: the mean over those
    domains d of (log PPL_base,d - log PPL_model,d) / (log PPL_base,d - log PPL_specialist,d):
    1.0 = as good as every specialist on its own domain at once (domains where the specialist
    did not beat the base are left out).
    """
    own = {r.model: r.perplexity[r.model] for r in results if r.role == "finetune" and r.model in r.perplexity}
    base = next((r for r in results if r.role == "base"), None)
    merges = [r for r in results if r.role == "merge"]
    best = min(merges, key=lambda r: r.mean).model if merges else None
    rows = []
    for r in results:
        changes = [r.perplexity[d] / ref - 1 for d, ref in own.items() if d in r.perplexity]
        gains = {d: gain for d in own if (gain := _gain(base, r, d, own[d])) is not None}
        rows.append({
            "model": r.model, "role": r.role, **{f"ppl_{d}": round(v, 4) for d, v in r.perplexity.items()},
            "ppl_mean": round(r.mean, 4), **{k: round(v, 4) for k, v in r.scores.items()},
            "vs_own_finetune": round(sum(changes) / len(changes), 4) if changes else None,
            "gain_retained": round(sum(gains.values()) / len(gains), 4) if gains else None,
            "kept_density": round(r.merge["kept_density"], 4) if r.merge else None,
            "merge_seconds": r.merge["seconds"] if r.merge else None,
            "method": method_name(r.merge) if r.merge else None,
            "label": method_label(r.merge) if r.merge else None,
            "best": r.model == best,
        })
    return rows


def _gain(base: "Evaluated | None", r: "Evaluated", domain: str, specialist: float) -> float | None:
    if base is None or domain not in base.perplexity or domain not in r.perplexity:
        return None
    reachable = math.log(base.perplexity[domain]) - math.log(specialist)
    if reachable <= 0:
        return None
    return (math.log(base.perplexity[domain]) - math.log(r.perplexity[domain])) / reachable


def method_name(merge: dict) -> str:
    """method/score, the score only where it selected something (density < 1)."""
    params = merge.get("params", {})
    score = params.get("score")
    density = params.get("density", 1.0)
    return merge["method"] + (f"/{score}" if score and isinstance(density, (int, float)) and density < 1 else "")


def method_label(merge: dict) -> str:
    """The method as a reader wants it: `ties/sparsegpt + OBS`, `task_arithmetic (λ 0.5)`."""
    params = merge.get("params", {})
    extras = []
    if params.get("lambda", 1.0) != 1.0:  # a number, or a schedule shown inline
        extras.append(f"λ {setting_text(params['lambda'])}")
    if "alpha" in params:
        extras.append(f"α {setting_text(params['alpha'])}")
    label = method_name(merge) + (" + OBS" if params.get("compensate") else "")
    return label + (f" ({', '.join(extras)})" if extras else "")


def render(rows: list[dict[str, Any]], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(rows, indent=2, allow_nan=False)
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


def plot(results: Sequence["Evaluated"], path: Path):
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
