"""The comparison: rows = models, columns = perplexity per dataset, mean, how much of each
specialist's gain a model keeps, density kept, merge time.

Two audiences: programs get every raw field at full precision (json/csv); people get one table
(`comparison_table`: four significant digits, percentages, method labels, ★ on the best merge)
that the terminal and markdown both show, and a grouped bar chart.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..engine.card import setting_text
from .gain import difference_with_se, gain_with_se



@dataclass(frozen=True)
class Evaluated:
    model: str
    role: str
    perplexity: dict[str, float]
    merge: dict | None = None
    scores: dict[str, float] = field(default_factory=dict)  # lm-evaluation-harness "task:metric"
    windows: dict[str, list[tuple[float, int]]] = field(default_factory=dict)  # per dataset: (NLL, tokens)
    documents: dict[str, list[int]] = field(default_factory=dict)  # per dataset: the document of each window

    @property
    def mean(self) -> float:
        values = list(self.perplexity.values())
        return sum(values) / len(values) if values else float("nan")


def comparison(results: Sequence[Evaluated]) -> list[dict[str, Any]]:
    """One dict per model.

    `vs_own_finetune`: the mean relative change, over the datasets that belong to a fine-tune, of
    this model's perplexity against that fine-tune's own. `gain_retained`: the mean over those
    domains d of (log PPL_base,d - log PPL_model,d) / (log PPL_base,d - log PPL_specialist,d):
    1.0 = as good as every specialist on its own domain at once (domains where the specialist
    did not beat the base are left out), with `gain_retained_se`, its jackknife standard error over
    the evaluation windows, those of one document left out together (`gain`), and for merges
    `gain_vs_best` +- `gain_vs_best_se`, the paired
    difference to the best merge (same windows: the noise they share cancels). Datasets no
    fine-tune owns (general text) get a perplexity column and count in the mean, never in the gain.
    """
    own = {r.model: r.perplexity[r.model] for r in results if r.role == "finetune" and r.model in r.perplexity}
    base = next((r for r in results if r.role == "base"), None)
    merges = [r for r in results if r.role == "merge"]
    best = min(merges, key=lambda r: r.mean) if merges else None
    domains = [d for d in own if base is not None and d in base.perplexity and base.perplexity[d] > own[d]]
    specialists = {r.model: r for r in results if r.model in domains and r.role == "finetune"}
    rows = []
    for r in results:
        changes = [r.perplexity[d] / ref - 1 for d, ref in own.items() if d in r.perplexity]
        gain = se = versus = versus_se = None
        if base is not None and domains and all(d in r.perplexity for d in domains):
            gain, se = _gain_with_se(base, specialists, r, None)
            if best is not None and r.role == "merge":
                versus, versus_se = _gain_with_se(base, specialists, r, best)
        rows.append({
            "model": r.model, "role": r.role, **{f"ppl_{d}": v for d, v in r.perplexity.items()},
            "ppl_mean": r.mean, **r.scores,
            "vs_own_finetune": sum(changes) / len(changes) if changes else None,
            "gain_retained": gain, "gain_retained_se": se, "gain_vs_best": versus, "gain_vs_best_se": versus_se,
            "kept_density": r.merge["kept_density"] if r.merge else None,
            "merge_seconds": r.merge["seconds"] if r.merge else None,
            "method": method_name(r.merge) if r.merge else None,
            "label": method_label(r.merge) if r.merge else None,
            "best": best is not None and r.model == best.model,
        })
    return rows


def _gain_with_se(base: Evaluated, specialists: dict[str, Evaluated], model: Evaluated,
                  reference: "Evaluated | None") -> tuple[float, float | None]:
    """The model's gain retained (minus the reference's, when given) and its jackknife SE, from the
    per-window losses the eval stage keeps. Results without them (made by hand) count as one window
    each: the value is the same, the SE unknown (None)."""
    involved = [base, *specialists.values(), model, *([reference] if reference else [])]
    per_window = all(d in e.windows for e in involved for d in specialists)

    def windows(e: Evaluated, d: str) -> list[tuple[float, int]]:
        return list(e.windows[d]) if per_window else [(math.log(e.perplexity[d]), 1)]
    sets = [{d: windows(e, d) for d in specialists} for e in (base, model, *([reference] if reference else []))]
    own = {d: windows(s, d) for d, s in specialists.items()}
    clusters = {d: model.documents[d] for d in specialists if per_window and model.documents.get(d)}
    value, se = (difference_with_se(sets[0], own, sets[1], sets[2], clusters) if reference
                 else gain_with_se(sets[0], own, sets[1], clusters))
    return value, se if per_window and math.isfinite(se) else None


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
    if (merge.get("search") or {}).get("mode") == "learned":
        extras.append("λ learned")
    elif merge.get("search"):
        extras.append(f"λ auto: {merge['search']['chosen']:.3g}")
    elif params.get("lambda", 1.0) != 1.0:  # a number, or a schedule shown inline
        extras.append(f"λ {setting_text(params['lambda'])}")
    if "alpha" in params:  # svc's alpha 0 is its default, 1/K (K = the number of models)
        svc_default = merge["method"] == "svc" and params["alpha"] == 0
        extras.append(f"α {'1/K' if svc_default else setting_text(params['alpha'])}")
    if params.get("embedding", "count") != "count":
        extras.append(f"embedding {params['embedding']}")
    label = method_name(merge) + (" + OBS" if params.get("compensate") else "")
    return label + (f" ({', '.join(extras)})" if extras else "")


ROLE_LABELS = {"finetune": "fine-tune"}
NUMBER = re.compile(r"[+-]?[\d.,]+(e[+-]?\d+)?%?( ± [\d.]+)?")


def perplexity_text(value: float) -> str:
    """Four significant digits, never an exponent (1.788, 14.48, 160.1, 2437): perplexities of one
    table span decades, and a fixed number of decimals gives 160.123 next to 1.788."""
    if not math.isfinite(value) or value == 0:
        return str(value)
    return f"{value:.{max(0, 3 - math.floor(math.log10(abs(value))))}f}"


def _percent(value: float | None, sign: str = "") -> str:
    return "" if value is None else f"{100 * value:{sign}.1f}%"


def _gain_text(row: dict[str, Any]) -> str:
    """`93.4% ± 0.7`: the gain retained and its standard error, in points."""
    text = _percent(row["gain_retained"])
    return text + (f" ± {100 * row['gain_retained_se']:.1f}" if text and row["gain_retained_se"] is not None else "")


def comparison_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """(columns, cells) as people read the comparison, shared by the terminal and markdown so that
    the README shows what the terminal shows. Results come first and how each merge was made last,
    so that a narrow terminal splits the table between the two (`display.table`)."""
    datasets = [k for k in rows[0] if k.startswith("ppl_") and k != "ppl_mean"]
    harness = [k for k in rows[0] if ":" in k]
    columns = ["model", *(d[4:] for d in datasets), "mean", *harness, "gain kept", "vs own FT", "method", "kept",
               "merge s"]
    cells = [[("★ " if row["best"] else "") + row["model"],
              *(perplexity_text(row[d]) for d in datasets), perplexity_text(row["ppl_mean"]),
              *(f"{row[k]:.4f}" for k in harness),
              _gain_text(row), _percent(row["vs_own_finetune"], "+"),
              row["label"] or ROLE_LABELS.get(row["role"], row["role"]), _percent(row["kept_density"]),
              "" if row["merge_seconds"] is None else f"{row['merge_seconds']:.1f}"]
             for row in rows]
    return columns, cells


def numeric_columns(cells: list[list[Any]]) -> list[bool]:
    """Which columns hold only numbers (and blanks): those are right-aligned, in the terminal and in
    markdown alike."""
    def numeric(column: tuple[Any, ...]) -> bool:
        filled = [str(c) for c in column if c not in ("", None)]
        return bool(filled) and all(NUMBER.fullmatch(c) for c in filled)

    return [numeric(column) for column in zip(*cells)]


def markdown(columns: list[str], cells: list[list[Any]]) -> str:
    """A GitHub markdown table, numbers right-aligned."""
    def line(values):
        return "| " + " | ".join("" if v is None else str(v).replace("|", "\\|") for v in values) + " |"

    align = ["---:" if right else "---" for right in numeric_columns(cells)] or ["---"] * len(columns)
    return "\n".join([line(columns), "|" + "|".join(align) + "|", *map(line, cells)]) + "\n"


def comparison_text(rows: list[dict[str, Any]], fmt: str) -> str:
    """The comparison as a file: json/csv hold every raw field at full precision (for programs),
    markdown the table people read, as the terminal shows it (for a README)."""
    return markdown(*comparison_table(rows)) if fmt == "markdown" else render(rows, fmt)


def render(rows: list[dict[str, Any]], fmt: str) -> str:
    """Dict rows as json, csv or a markdown table, the values as they are."""
    if fmt == "json":
        return json.dumps(rows, indent=2, allow_nan=False)
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        return buffer.getvalue()
    if fmt == "markdown":
        return markdown(list(rows[0]), [list(row.values()) for row in rows])
    raise ValueError(f"unknown format {fmt!r}")


def _bar_styles(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One look per model: the base dark grey, fine-tunes lighter greys each with its own hatch (the
    references), merges in a qualitative palette without its greys (the candidates), the best one
    outlined in black."""
    from matplotlib import colormaps

    qualitative = [c for name in ("tab10", "tab20", "Set3") for c in colormaps[name].colors
                   if len({round(x, 2) for x in c}) > 1]  # greys would read as references
    unique = list(dict.fromkeys(qualitative))
    finetunes = [r for r in rows if r["role"] == "finetune"]
    hatches = ["//", "\\\\", "..", "xx", "++", "oo", "--", "||"]
    styles, merges = [], 0
    for row in rows:
        if row["role"] == "merge":
            style = {"color": unique[merges % len(unique)], "edgecolor": "black" if row["best"] else "none",
                     "linewidth": 1.2 if row["best"] else 0}
            merges += 1
        elif row["role"] == "finetune":
            i = finetunes.index(row)
            shade = 0.45 + 0.25 * i / max(1, len(finetunes) - 1)
            style = {"color": str(round(shade, 3)), "hatch": hatches[i % len(hatches)], "edgecolor": "white",
                     "linewidth": 0}
        else:
            style = {"color": "0.2", "edgecolor": "none", "linewidth": 0}
        styles.append(style)
    return styles


def log_ticks(low: float, high: float) -> list[float]:
    """Tick values on a log axis that show numbers: whole decades when there are enough of them,
    else 1-2-5 steps, else every multiple, else even steps (a range inside one decade)."""
    from matplotlib.ticker import MaxNLocator

    decades = range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
    for mantissas in ((1,), (1, 2, 5), range(1, 10)):
        ticks = [m * 10.0 ** e for e in decades for m in mantissas if low <= m * 10.0 ** e <= high]
        if len(ticks) >= 4:
            return ticks
    return [float(t) for t in MaxNLocator(5).tick_values(low, high) if low <= t <= high]


def plot(rows: list[dict[str, Any]], path: Path):
    """Grouped bars of the comparison rows: one group per dataset and one for the mean, one bar per
    model (log-scaled perplexity), the best merge starred. Returns the figure (tests inspect it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    keys = [k for k in rows[0] if k.startswith("ppl_") and k != "ppl_mean"] + ["ppl_mean"]
    width = 0.84 / len(rows)
    values = [row[k] for row in rows for k in keys]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.5 + 0.16 * len(rows) * len(keys)), 4.6), layout="constrained")
    for i, (row, style) in enumerate(zip(rows, _bar_styles(rows))):
        xs = [g + (i - (len(rows) - 1) / 2) * width for g in range(len(keys))]
        ys = [row[k] for k in keys]
        ax.bar(xs, ys, width, label=row["model"] + ("  ★ best" if row["best"] else ""), **style)
        if row["best"]:
            ax.plot(xs, [y * 1.15 for y in ys], linestyle="none", marker="*", markersize=12,
                    color=style["color"], markeredgecolor="black", markeredgewidth=0.8, gid="best")
    ax.axvline(len(keys) - 1.5, color="0.6", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(keys)), [k[4:] for k in keys])
    ax.get_xticklabels()[-1].set_fontweight("bold")
    ax.set_xlim(-0.5, len(keys) - 0.5)
    # bars start at perplexity 1 (no loss) where the data allows: a bar's height is then the loss
    low, high = min(1.0, min(values) / 1.3), max(values) * 1.4
    ax.set_yscale("log")
    ax.set_ylim(low, high)
    ax.yaxis.set_major_locator(FixedLocator(log_ticks(low, high)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.grid(axis="y", which="major", color="0.88", linewidth=0.8)
    ax.set_axisbelow(True)
    ax.spines[["top", "right"]].set_visible(False)
    ax.set_ylabel("perplexity (log scale, lower is better)")
    ax.set_title("perplexity on held-out text per dataset, and the mean", loc="left")
    fig.legend(loc="outside lower center", ncol=min(len(rows), 6), frameon=False, fontsize="small",
               handlelength=1.6, columnspacing=1.2)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    return fig
