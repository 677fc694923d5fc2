"""What people read of a comparison: the terminal table (80 columns and wide), markdown that shows
the same cells, the chart's properties. No models: rows shaped like the demo's (README numbers)."""

import json
import math

import pytest
from matplotlib.colors import to_rgb
from rich.console import Console

from mergecli.app.display import table
from mergecli.quality.report import (comparison, comparison_table, comparison_text, log_ticks, method_label,
                                     perplexity_text, plot)
from mergecli.stages.compare import comparison_view
from mergecli.quality.report import Evaluated

# model, role, method and its parameters, perplexity on code / verse / arithmetic
DEMO = [
    ("base", "base", None, 14.48, 160.1, 4.211),
    ("code", "finetune", None, 12.13, 137.3, 3.506),
    ("verse", "finetune", None, 14.15, 80.8, 3.365),
    ("arithmetic", "finetune", None, 21.15, 210.2, 1.788),
    ("task-arithmetic", "merge", ("task_arithmetic", {"lambda": 0.5}), 13.29, 101.7, 1.843),
    ("ties", "merge", ("ties", {"score": "magnitude", "density": 0.2}), 15.85, 140.9, 1.781),
    ("dare-ties", "merge", ("dare_ties", {"score": "random", "density": 0.2}), 18.29, 126.6, 1.843),
    ("ties-sparsegpt", "merge", ("ties", {"score": "sparsegpt", "density": 0.2}), 15.72, 146.3, 1.780),
    ("ties-wanda", "merge", ("ties", {"score": "wanda", "density": 0.2}), 15.75, 149.4, 1.784),
    ("dare-ties-sparsegpt", "merge", ("dare_ties", {"score": "sparsegpt", "density": 0.2}), 17.25, 128.7, 1.795),
    ("ties-sparsegpt-obs", "merge", ("ties", {"score": "sparsegpt", "density": 0.2, "compensate": True}),
     15.69, 133.4, 1.783),
    ("regmean", "merge", ("regmean", {"alpha": 0.9}), 12.36, 89.5, 1.817),
]


@pytest.fixture
def rows():
    results = []
    for i, (name, role, method, *ppl) in enumerate(DEMO):
        merge = None if method is None else {"method": method[0], "params": method[1], "seconds": 2.5 + i,
                                             "kept_density": method[1].get("density", 1.0)}
        results.append(Evaluated(name, role, dict(zip(["code", "verse", "arithmetic"], ppl)), merge))
    return comparison(results)


def printed(renderable, width: int) -> list[str]:
    console = Console(width=width, record=True, file=open("/dev/null", "w"))
    console.print(renderable)
    return console.export_text().splitlines()


def test_perplexity_has_four_significant_digits_and_no_exponent():
    assert [perplexity_text(v) for v in (1.78812, 14.4811, 160.123, 2437.4, 123456.7)] == \
        ["1.788", "14.48", "160.1", "2437", "123457"]


def test_markdown_shows_the_cells_of_the_terminal_table(rows):
    view = comparison_view(rows)
    lines = comparison_text(rows, "markdown").splitlines()
    assert lines[0] == "| " + " | ".join(view.columns) + " |"
    assert lines[0] == ("| model | code | verse | arithmetic | mean | gain kept | vs own FT | method | kept | "
                        "merge s |")
    assert lines[1] == "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|"  # numbers right-aligned
    assert [line.split(" | ") for line in lines[2:]] == \
        [[("| " if i == 0 else "") + c + (" |" if i == len(cells) - 1 else "") for i, c in enumerate(cells)]
         for cells in view.rows]
    best = dict(zip(view.columns, view.rows[-1]))
    assert best == {"model": "★ regmean", "code": "12.36", "verse": "89.50", "arithmetic": "1.817", "mean": "34.56",
                    "gain kept": "90.9%", "vs own FT": "+4.8%", "method": "regmean (α 0.9)", "kept": "100.0%",
                    "merge s": "13.5"}
    labels = [dict(zip(view.columns, r))["method"] for r in view.rows]
    assert labels[:5] == ["base", "fine-tune", "fine-tune", "fine-tune", "task_arithmetic (λ 0.5)"]
    assert "ties/sparsegpt + OBS" in labels and sum("★" in r[0] for r in view.rows) == 1


def test_json_and_csv_keep_raw_fields_at_full_precision(rows):
    data = json.loads(comparison_text(rows, "json"))
    assert data == rows
    gains = [math.log(b / m) / math.log(b / s) for b, m, s in ((14.48, 15.85, 12.13), (160.1, 140.9, 80.8),
                                                                (4.211, 1.781, 1.788))]
    assert data[5]["gain_retained"] == pytest.approx(sum(gains) / 3, rel=1e-12)
    assert data[5]["gain_retained"] != round(data[5]["gain_retained"], 4)
    assert {"gain_retained", "vs_own_finetune", "kept_density", "merge_seconds", "method", "label"} <= set(data[0])
    header = comparison_text(rows, "csv").splitlines()[0].split(",")
    assert header[:6] == ["model", "role", "ppl_code", "ppl_verse", "ppl_arithmetic", "ppl_mean"]


def test_terminal_table_fits_80_columns_without_breaking_a_cell(rows):
    view = comparison_view(rows)
    lines = printed(table(view.title, view.columns, view.rows, width=80), 80)
    assert max(map(len, lines)) <= 80
    for cells in view.rows:  # every cell whole on its row's line, the row's name on each part
        on_rows = [line for line in lines if line.startswith(f" {cells[0]} ") or line.startswith(f"{cells[0]} ")]
        assert on_rows and all(any(c in line for line in on_rows) for c in cells), cells
    headers = " ".join(lines)
    assert all(word in headers for column in view.columns for word in column.split())


def test_terminal_table_is_one_table_when_wide(rows):
    view = comparison_view(rows)
    lines = printed(table(view.title, view.columns, view.rows, width=160), 160)
    assert sum("model" in line for line in lines) == 1
    assert len(lines) < 2 + 3 + len(rows) + 2
    assert all(len(line) <= 120 for line in lines)  # fits a common wide terminal


def test_log_ticks_name_numbers_on_every_range():
    assert log_ticks(1, 300) == [1, 2, 5, 10, 20, 50, 100, 200]
    assert log_ticks(1, 30000) == [1, 10, 100, 1000, 10000]
    assert log_ticks(2, 9) == [2, 3, 4, 5, 6, 7, 8, 9]
    narrow = log_ticks(90, 130)
    assert len(narrow) >= 3 and all(90 <= t <= 130 for t in narrow)


def test_chart_every_model_its_colour_references_grey_mean_group_best_starred(tmp_path, rows):
    fig = plot(rows, tmp_path / "c.png")
    ax = fig.axes[0]
    groups = 3 + 1  # datasets + mean
    assert len(ax.patches) == len(rows) * groups
    colours = [to_rgb(p.get_facecolor()) for p in ax.patches[::groups]]  # the first bar of each model
    assert len(set(colours)) == len(rows)
    grey = [len({round(x, 3) for x in c}) == 1 for c in colours]
    assert grey == [r["role"] != "merge" for r in rows]
    hatched = [bool(p.get_hatch()) for p in ax.patches[::groups]]
    assert hatched == [r["role"] == "finetune" for r in rows]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["code", "verse", "arithmetic", "mean"]
    stars = [line for line in ax.lines if line.get_gid() == "best"]
    best = next(i for i, r in enumerate(rows) if r["best"])
    centres = [p.get_x() + p.get_width() / 2 for p in ax.patches[best * groups:(best + 1) * groups]]
    assert len(stars) == 1 and list(stars[0].get_xdata()) == pytest.approx(centres)
    assert ax.get_yscale() == "log"
    fig.canvas.draw()
    ticks = [t.get_text() for t in ax.get_yticklabels() if t.get_visible()]
    assert len(ticks) >= 4 and all(t.replace(".", "").isdigit() for t in ticks)
    legend = fig.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == [r["model"] + ("  ★ best" if r["best"] else "") for r in rows]
    figure, axes, key = (b.extents for b in (fig.bbox, ax.get_window_extent(), legend.get_window_extent()))
    assert key[1] >= figure[1] and key[3] <= axes[1]  # the legend lies under the axes, inside the figure
    assert (axes[2] - axes[0]) * (axes[3] - axes[1]) > 0.6 * fig.bbox.width * fig.bbox.height
    assert (tmp_path / "c.png").stat().st_size > 20_000


def test_gain_cell_carries_the_jackknife_se_when_windows_are_kept():
    from mergecli.quality.gain import difference_with_se, gain_with_se

    def windows(level, wobble):
        return [(level * 100 * (1 + wobble * ((k * 7) % 5 - 2) / 10), 100) for k in range(8)]
    ppl = {"base": (2.0, 3.0), "a": (1.5, 3.1), "b": (2.1, 2.2), "m1": (1.6, 2.4), "m2": (1.7, 2.3)}
    results = []
    for name, (code, verse) in ppl.items():
        w = {"code": windows(code, 0.1 if name != "m2" else 0.12), "verse": windows(verse, 0.2),
             "general": windows(3.5, 0.1)}
        role = "base" if name == "base" else "finetune" if name in ("a", "b") else "merge"
        merge = {"method": "regmean", "params": {"alpha": 0.9}, "seconds": 1.0, "kept_density": 1.0} \
            if role == "merge" else None
        results.append(Evaluated(name, role, {d: math.exp(sum(s for s, _ in v) / 800) for d, v in w.items()}, merge,
                                 windows=w))
    rows = comparison([Evaluated(r.model if r.model not in ("a", "b") else {"a": "code", "b": "verse"}[r.model],
                                 r.role, r.perplexity, r.merge, windows=r.windows) for r in results])
    by = {r["model"]: r for r in rows}
    w = {r.model: r.windows for r in results}
    spec = {"code": w["a"]["code"], "verse": w["b"]["verse"]}
    value, se = gain_with_se(w["base"], spec, w["m1"])
    assert by["m1"]["gain_retained"] == pytest.approx(value) and by["m1"]["gain_retained_se"] == pytest.approx(se)
    assert se > 0 and by["base"]["gain_retained"] == pytest.approx(0) and by["code"]["gain_retained"] is not None
    best, other = ("m1", "m2") if by["m1"]["best"] else ("m2", "m1")
    diff, diff_se = difference_with_se(w["base"], spec, w[other], w[best])
    assert by[other]["gain_vs_best"] == pytest.approx(diff) and by[other]["gain_vs_best_se"] == pytest.approx(diff_se)
    cells = dict(zip(*[comparison_table(rows)[0], comparison_table(rows)[1][3]]))
    assert cells["gain kept"] == f"{100 * value:.1f}% ± {100 * se:.1f}"
    assert comparison_text(rows, "markdown").splitlines()[1].split("|")[6] == "---:"  # still a number column


@pytest.mark.parametrize("method,alpha,shown", [("regmean", 0.9, "regmean (α 0.9)"), ("svc", 0.0, "svc (α 1/K)"),
                                                 ("svc", 0.5, "svc (α 0.5)")])
def test_method_label_says_what_alpha_means(method, alpha, shown):
    """svc's alpha 0 stands for its default 1/K; the label says so rather than "α 0"."""
    assert method_label({"method": method, "params": {"alpha": alpha}}) == shown
