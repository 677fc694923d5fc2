"""eval and compare: perplexity against transformers' own loss, every export format parsed back."""

import csv
import io
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import CODE, TEXT, VERSE, cli, write_jsonl, write_recipe
from mergecli.engine.calibration import make_windows
from mergecli.quality.report import comparison, plot
from mergecli.engine.perplexity import nll_sum
from mergecli.quality.report import Evaluated



def test_perplexity_equals_transformers_loss_on_the_same_windows(models):
    model = AutoModelForCausalLM.from_pretrained(models / "ft_a").eval()
    tok = AutoTokenizer.from_pretrained(models / "base")
    packed = make_windows(CODE, tok, samples=4, seq_len=32, seed=0)
    total, count = nll_sum(model, packed, 3, torch.device("cpu"))
    with torch.no_grad():
        loss = model(input_ids=packed.input_ids, labels=packed.input_ids).loss
    assert count == 4 * 31
    assert abs(total / count - loss.item()) / loss.item() < 1e-4
    # padded windows: pad positions never count (labels -100 there in the reference)
    padded = make_windows(["x = 1", "def add(a, b):", VERSE[0]], tok, samples=3, seq_len=32, seed=0, pack=False)
    total, count = nll_sum(model, padded, 2, torch.device("cpu"))
    labels = padded.input_ids.masked_fill(padded.attention_mask == 0, -100)
    with torch.no_grad():
        loss = model(input_ids=padded.input_ids, attention_mask=padded.attention_mask, labels=labels).loss
    assert count == int(padded.attention_mask[:, 1:].sum())
    assert abs(total / count - loss.item()) / loss.item() < 1e-4


@pytest.fixture
def recipe(tmp_path, models):
    write_jsonl(tmp_path / "code.jsonl", CODE)
    write_jsonl(tmp_path / "verse.jsonl", VERSE)
    write_jsonl(tmp_path / "general.jsonl", TEXT * 10)  # text no fine-tune trained on: a column, no gain
    return write_recipe(tmp_path / "r.yaml", str(models / "base"), [
        {"name": "code", "model": str(models / "ft_a"), "dataset": {"path": "./code.jsonl"}},
        {"name": "verse", "model": str(models / "lora_c"), "dataset": {"path": "./verse.jsonl"}},
    ], [{"name": "ta", "method": "task_arithmetic", "lambda": 0.5},
        {"name": "ties-sg", "method": "ties", "score": "sparsegpt"}],
        calibration={"samples": 4, "seq_len": 16},
        evaluation={"samples": 8, "seq_len": 16, "datasets": {"general": {"path": "./general.jsonl"}}})


def test_compare_runs_missing_stages_and_every_format_parses_back(tmp_path, recipe, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    result = cli("compare", str(recipe), "--plot", str(tmp_path / "chart.png"), code=None)
    assert result.exit_code == 0, result.stderr
    assert "★ ties-sg" in result.stdout or "★ ta" in result.stdout
    assert "vs own" in result.stdout and "ties/sparsegpt" in result.stdout
    assert max(map(len, result.stdout.splitlines())) <= 80
    assert (tmp_path / "chart.png").stat().st_size > 10_000
    rows = json.loads(cli("compare", str(recipe), "--format", "json", code=None).stdout)
    assert [r["model"] for r in rows] == ["base", "code", "verse", "ta", "ties-sg"]
    assert sum(r["best"] for r in rows) == 1
    best = min((r for r in rows if r["role"] == "merge"), key=lambda r: r["ppl_mean"])
    assert best["best"]
    code = next(r for r in rows if r["model"] == "code")
    assert code["vs_own_finetune"] == pytest.approx((code["ppl_verse"] / rows[2]["ppl_verse"] - 1) / 2, abs=1e-3)
    assert rows[3]["kept_density"] > 0 and rows[4]["method"] == "ties/sparsegpt"
    csv_out = cli("compare", str(recipe), "--format", "csv", code=None).stdout
    parsed = list(csv.DictReader(io.StringIO(csv_out)))
    assert [r["model"] for r in parsed] == [r["model"] for r in rows]
    assert float(parsed[0]["ppl_code"]) == pytest.approx(rows[0]["ppl_code"])
    md = cli("compare", str(recipe), "--format", "markdown", "--output", str(tmp_path / "t.md"), code=None)
    lines = md.stdout.strip().splitlines()
    assert lines[0] == "| model | code | verse | general | mean | gain kept | vs own FT | method | kept | merge s |"
    by_model = {line.split(" | ")[0].removeprefix("| ").removeprefix("★ "): line for line in lines[2:]}
    assert list(by_model) == [r["model"] for r in rows] and by_model[best["model"]].startswith("| ★ ")
    assert "| task_arithmetic (λ 0.5) | 100.0% |" in by_model["ta"] and "%" in by_model["code"]
    assert (tmp_path / "t.md").read_text() == md.stdout
    # eval results are cached: the entries did not multiply
    entries = json.loads((tmp_path / "ws" / "manifest.json").read_text())["entries"]
    assert sum(e["kind"] == "eval" for e in entries.values()) == 5 * 3


def test_compare_replaces_only_its_own_unchanged_reports(tmp_path, recipe):
    """Rerunning compare with the same --output/--plot replaces the files it wrote; a file it did
    not write, or one edited since, is refused with one line and left as it was."""
    report, chart = tmp_path / "t.md", tmp_path / "c.png"
    for _ in range(2):
        cli("compare", str(recipe), "--format", "markdown", "--output", str(report), "--plot", str(chart))
    assert report.read_text().startswith("| model |") and chart.stat().st_size > 10_000
    report.write_text(report.read_text() + "my notes\n")
    result = cli("compare", str(recipe), "--format", "markdown", "--output", str(report), code=1)
    assert "is not a report mergecli wrote" in result.stderr and report.read_text().endswith("my notes\n")
    mine = tmp_path / "mine.csv"
    mine.write_text("a,b\n")
    result = cli("compare", str(recipe), "--format", "csv", "--output", str(mine), code=1)
    assert "--output" in result.stderr and mine.read_text() == "a,b\n"
    assert not list(tmp_path.glob(".*.tmp*")) and not list(tmp_path.glob(".t.md*"))


def test_gain_has_a_jackknife_se_and_general_text_only_a_perplexity(recipe):
    from mergecli.quality.gain import gain_with_se

    rows = json.loads(cli("compare", str(recipe), "--format", "json", code=None).stdout)
    data = {d["model"]: d for d in json.loads(cli("--json", "eval", str(recipe), code=None).stdout)}
    assert all(r["ppl_general"] > 1 for r in rows)
    assert rows[0]["ppl_mean"] == pytest.approx(sum(rows[0][f"ppl_{d}"] for d in ("code", "verse", "general")) / 3)
    domains = [d for d in ("code", "verse") if data["base"]["perplexity"][d] > data[d]["perplexity"][d]]
    for row in rows:
        if not domains:
            assert row["gain_retained"] is None
            continue
        windows = {name: {d: [tuple(w) for w in data[name]["windows"][d]] for d in domains}
                   for name in ("base", row["model"], *domains)}
        clusters = {d: data["base"]["documents"][d] for d in domains}  # windows of one document left out together
        value, se = gain_with_se(windows["base"], {d: windows[d][d] for d in domains}, windows[row["model"]], clusters)
        assert row["gain_retained"] == pytest.approx(value)
        assert row["gain_retained_se"] == (None if math.isnan(se) else pytest.approx(se))
    merges = [r for r in rows if r["role"] == "merge"]
    assert all(r["gain_vs_best"] == 0 and r["gain_vs_best_se"] == 0 for r in merges if r["best"])


def test_eval_json_and_the_chart_has_one_bar_per_model_and_dataset(tmp_path, recipe):
    result = cli("--json", "eval", str(recipe), code=None)
    data = json.loads(result.stdout)
    assert {d["model"] for d in data} == {"base", "code", "verse", "ta", "ties-sg"}
    assert all(d["perplexity"]["code"] > 1 for d in data)
    results = [Evaluated(d["model"], d["role"], d["perplexity"]) for d in data]
    fig = plot(comparison(results), tmp_path / "c.png")
    ax = fig.axes[0]
    assert len(ax.patches) == 5 * (3 + 1) and ax.get_yscale() == "log"  # a group per dataset and the mean
    assert ax.get_ylabel() and len(fig.legends[0].get_texts()) == 5


def test_gc_keeps_everything_the_recipe_uses(tmp_path, recipe):
    assert cli("compare", str(recipe), code=None).exit_code == 0
    before = json.loads((tmp_path / "ws" / "manifest.json").read_text())["entries"]
    result = json.loads(cli("--json", "ws", "gc", str(recipe), code=None).stdout)
    assert result["removed"] == 0
    assert json.loads((tmp_path / "ws" / "manifest.json").read_text())["entries"].keys() == before.keys()
    again = cli("--json", "compare", str(recipe), code=None)
    assert again.exit_code == 0 and "computed" not in again.stderr and "collected" not in again.stderr


def test_python_api_compare_returns_the_table_keyed_by_model(recipe):
    from mergecli import compare, load_recipe

    results = compare(load_recipe(recipe))
    assert list(results) == ["base", "code", "verse", "ta", "ties-sg"]
    best = [name for name, row in results.items() if row["best"]]
    assert len(best) == 1 and results[best[0]]["role"] == "merge"
