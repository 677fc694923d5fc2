"""The optional lm-evaluation-harness backend, on a local multiple-choice task (offline)."""

import json
import sys

import pytest

from helpers import cli, write_recipe

TEXT = [f"Question: what is {i} plus 1?\nAnswer: {i + 1}." for i in range(80)]


@pytest.fixture
def recipe(tmp_path, models):
    (tmp_path / "arith.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in TEXT))
    (tmp_path / "mc.jsonl").write_text("\n".join(
        json.dumps({"question": f"what is {i} plus 1?", "choices": [str(i + 1), str(i + 7)], "answer": 0})
        for i in range(8)))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "arith.yaml").write_text(f"""
task: mergecli_arith
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path / 'mc.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""")
    return write_recipe(tmp_path / "r.yaml", str(models / "base"), [
        {"name": "a", "model": str(models / "ft_a"), "dataset": {"path": "./arith.jsonl"}},
        {"name": "c", "model": str(models / "lora_c"), "dataset": {"path": "./arith.jsonl"}},
    ], [{"name": "ta", "method": "task_arithmetic"}],
        evaluation={"samples": 2, "seq_len": 16,
                    "lm_eval": {"tasks": ["mergecli_arith"], "include_path": "./tasks", "limit": 4}})


def test_harness_scores_join_the_comparison(recipe):
    pytest.importorskip("lm_eval")
    result = cli("--json", "compare", str(recipe), code=None)
    assert result.exit_code == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [r["model"] for r in rows] == ["base", "a", "c", "ta"]
    assert all(0.0 <= r["mergecli_arith:acc"] <= 1.0 for r in rows)
    again = cli("--json", "compare", str(recipe), code=None)
    assert json.loads(again.stdout) == rows  # cached, identical
    harness = [e for e in json.loads(cli("--json", "ws", "ls", recipe).stdout) if e["kind"] == "lmeval"]
    assert len(harness) == 4 and all(e["used"] for e in harness)
    assert json.loads(cli("--json", "ws", "gc", recipe).stdout)["removed"] == 0  # gc keeps what the recipe uses


def test_without_the_extra_the_message_says_what_to_install(recipe, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    result = cli("compare", str(recipe), code=None)
    assert result.exit_code == 1
    assert "needs the lm-evaluation-harness" in result.stderr and "mergecli[lmeval]" in result.stderr
