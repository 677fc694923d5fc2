"""The command line as people type it: flags last, help that shows what to type, tables that read
at 80 columns, a line per model while evaluation runs."""

import json
import os
import subprocess
import sys

from helpers import CODE, cli, error_line, write_jsonl, write_recipe


def recipe_for(tmp_path, models):
    write_jsonl(tmp_path / "code.jsonl", CODE)
    return write_recipe(tmp_path / "r.yaml", str(models / "base"), [
        {"name": "a", "model": str(models / "ft_a"), "dataset": {"path": "./code.jsonl"}},
        {"name": "b", "model": str(models / "ft_b")}],
        [{"name": "ta", "method": "task_arithmetic", "lambda": 0.5}],
        evaluation={"samples": 2, "seq_len": 16})


def mergecli(*args, cwd=None):
    env = {**os.environ, "COLUMNS": "80", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "mergecli", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def test_global_options_may_follow_the_command(tmp_path, models):
    recipe = recipe_for(tmp_path, models)
    after = mergecli("validate", recipe, "--json")
    assert after.returncode == 0, after.stderr
    assert json.loads(after.stdout)["valid"] is True
    both = mergecli("-q", "taskvec", recipe, "--workspace", tmp_path / "elsewhere", "--json")
    assert both.returncode == 0, both.stderr
    assert all(str(tmp_path / "elsewhere") in row["path"] for row in json.loads(both.stdout))
    assert not (tmp_path / "ws").exists()


def test_help_shows_what_to_type():
    """A switch shows no value, an option the kind of value it takes, arguments their names."""
    shown = mergecli("merge", "--help").stdout
    overwrite = next(line for line in shown.splitlines() if "--overwrite" in line)
    only = next(line for line in shown.splitlines() if "--only" in line)
    assert "<bool>" not in overwrite and "NAME" in only and "<list" not in only
    assert "RECIPE" in shown and "KEY=VALUE" in shown and "{recipe}" not in shown
    top = mergecli("--help").stdout
    assert "<bool>" not in next(line for line in top.splitlines() if "--quiet" in line)


def test_ws_ls_is_one_readable_row_per_artifact_and_needs_a_workspace(tmp_path, models):
    recipe = recipe_for(tmp_path, models)
    cli("taskvec", recipe)
    listed = mergecli("ws", "ls", recipe)
    assert listed.returncode == 0, listed.stderr
    rows = [line for line in listed.stdout.splitlines() if line.strip().startswith("taskvec")]
    assert len(rows) == 2 and all("taskvec a" in r or "taskvec b" in r for r in rows)
    assert all(len(line) <= 80 for line in listed.stdout.splitlines())
    assert not any(len(word) == 20 and all(c in "0123456789abcdef" for c in word)
                   for word in listed.stdout.split())  # the keys are in --json, not in the table
    assert "key" in json.loads(mergecli("--json", "ws", "ls", recipe).stdout)[0]
    assert "which workspace?" in error_line(cli("ws", "ls", code=2))


def test_evaluation_says_each_model_as_it_finishes(tmp_path, models):
    log = cli("eval", recipe_for(tmp_path, models)).stderr
    for model in ("base", "a", "b", "ta"):
        assert f"eval {model} on a: perplexity" in log


def test_a_mergekit_moe_config_given_to_a_stage_says_which_command_builds_it(tmp_path, models):
    config = tmp_path / "moe.yml"
    config.write_text(f"base_model: {models / 'base'}\ngate_mode: random\nexperts:\n"
                      f"  - source_model: {models / 'ft_a'}\n  - source_model: {models / 'ft_b'}\n")
    line = error_line(cli("merge", config, code=2))
    assert "a mergekit-moe config" in line and "mergecli moe moe.yml" in cli("merge", config, code=2).stderr
