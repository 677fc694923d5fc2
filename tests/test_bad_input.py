"""The bad-input catalogue: each case is one clear line naming the problem, exit code != 0, no
traceback, and nothing written (no output folder, no new cache entry)."""

import json
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file, save_file

from helpers import CODE, cli, error_line, make_llama, make_lora, write_jsonl


@pytest.fixture
def lab(tmp_path, models):
    """A working recipe in tmp_path; cases break one thing each."""
    write_jsonl(tmp_path / "code.jsonl", CODE)
    recipe = {"name": "t", "base": str(models / "base"),
              "models": [{"name": "a", "model": str(models / "ft_a"), "dataset": {"path": "./code.jsonl"}},
                         {"name": "b", "model": str(models / "ft_b"), "dataset": {"path": "./code.jsonl"}}],
              "merges": [{"name": "ties", "method": "ties"}],
              "calibration": {"samples": 2, "seq_len": 16}, "evaluation": {"samples": 2, "seq_len": 16},
              "workspace": "ws", "output_dir": "out"}
    return tmp_path, recipe, models


def set_path(data, dotted, value):
    node = data
    keys = dotted.split(".")
    for k in keys[:-1]:
        node = node[int(k)] if k.isdigit() else node[k]
    last = keys[-1]
    if value is DELETE:
        del node[int(last) if last.isdigit() else last]
    elif isinstance(node, list) and int(last) == len(node):
        node.append(value)
    else:
        node[int(last) if last.isdigit() else last] = value


DELETE = object()


def nan_finetune(tmp, models):
    src = models / "ft_a"
    dst = tmp / "nan_ft"
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    tensors = load_file(dst / "model.safetensors")
    tensors = {k: v.clone() for k, v in tensors.items()}
    tensors["model.norm.weight"][0] = float("nan")
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return str(dst)


def other_base_lora(tmp, models):
    make_llama(tmp / "elsewhere", seed=9)
    make_lora(tmp / "elsewhere", tmp / "lora_other", seed=1)
    return str(tmp / "lora_other")


def dora(tmp, models):
    make_lora(models / "base", tmp / "dora", seed=1, use_dora=True)
    return str(tmp / "dora")


def not_a_model(tmp, models):
    (tmp / "empty").mkdir()
    return str(tmp / "empty")


def bigger_vocab(tmp, models):
    make_llama(tmp / "bigvocab", seed=0, vocab_size=100)
    return str(tmp / "bigvocab")


def gpt2(tmp, models):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=96, bos_token_id=0,
                               eos_token_id=0)).save_pretrained(tmp / "gpt2")
    return str(tmp / "gpt2")


def foreign_output(tmp, models):
    (tmp / "out" / "ties").mkdir(parents=True)
    (tmp / "out" / "ties" / "notes.txt").write_text("mine")


# (id, command, recipe edits {dotted: value | callable(tmp, models)}, raw recipe text or None, extra args, message)
CASES = [
    ("missing-base", "merge", {"base": "./no/such/base"}, None, [], "base: path does not exist"),
    ("missing-finetune", "merge", {"models.0.model": "./nope"}, None, [], "models.0.model: path does not exist"),
    ("yaml-syntax", "merge", {}, "base: [unclosed\n", [], "YAML syntax error at line"),
    ("not-a-mapping", "merge", {}, "- just\n- a list\n", [], "a recipe is a YAML mapping"),
    ("unknown-key", "merge", {"merges.0.densty": 0.3}, None, [], "unknown field (did you mean 'density'?)"),
    ("wrong-type", "merge", {"models.0.weight": "heavy"}, None, [], "models.0.weight: must be a number, got 'heavy'"),
    ("density-high", "merge", {"merges.0.density": 1.2}, None, [], "merges.0.density: must be in (0, 1]"),
    ("density-zero", "merge", {"merges.0.density": 0.0}, None, [], "merges.0.density: must be in (0, 1]"),
    ("zero-finetunes", "merge", {"models": []}, None, [], "models: List should have at least 1 item"),
    ("base-as-finetune", "merge", {"models.0.model": "BASE"}, None, [], "is the base model itself"),
    ("unknown-method", "merge", {"merges.0.method": "dare"}, None, [], "unknown method 'dare'"),
    ("duplicate-variant", "merge", {"merges.1": {"name": "ties", "method": "ties"}}, None, [], "duplicate merge name"),
    ("unsupported-dtype", "merge", {"merges.0.dtype": "float8"}, None, [], "merges.0.dtype"),
    ("architecture-mismatch", "merge", {"models.0.model": gpt2}, None, [], "architecture 'gpt2' does not match"),
    ("shape-mismatch", "merge", {"models.0.model": bigger_vocab}, None, [], "shape [100, 32] in the fine-tune"),
    ("lora-for-another-base", "merge", {"models.1.model": other_base_lora}, None, [], "adapter was trained on"),
    ("dora-adapter", "taskvec", {"models.1.model": dora, "models.1.check_base": False}, None, [], "DoRA"),
    ("not-a-model-folder", "merge", {"models.0.model": not_a_model}, None, [], "neither a model (config.json)"),
    ("nan-in-input", "merge", {"models.0.model": nan_finetune}, None, [], "NaN/Inf"),
    ("empty-dataset", "hessian", {"models.0.dataset.path": "./empty.jsonl"}, None, [], "empty.jsonl is empty"),
    ("blank-dataset", "hessian", {"models.0.dataset.path": "./blank.jsonl"}, None, [], "has no non-empty text"),
    ("too-short-calibration", "hessian", {"calibration.samples": 400}, None, [], "400 windows of 16 need 6400"),
    ("missing-text-field", "hessian", {"models.0.dataset.text_field": "content"}, None, [], "has no column 'content'"),
    ("dataset-needed", "merge", {"models.0.dataset": DELETE, "merges.0.score": "sparsegpt"}, None, [],
     "models.0.dataset: required by merge 'ties'"),
    ("output-not-ours", "merge", {"_setup": foreign_output}, None, [], "exists and was not written by mergecli"),
    ("gpu-absent", "merge", {}, None, ["--device", "cuda"], "no such CUDA device is available"),
    ("unknown-device", "merge", {}, None, ["--device", "tpu9"], "unknown device 'tpu9'"),
    ("hub-id-offline", "merge", {"base": "some-org/no-such-model"}, None, [], "cannot get some-org/no-such-model"),
    ("bad-override", "merge", {}, None, ["merges.0.density"], "is not key=value"),
    ("unknown-only", "merge", {}, None, ["--only", "nope"], "no merge named 'nope'"),
    ("unknown-format", "compare", {}, None, ["--format", "xml"], "unknown --format 'xml'"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(lab, case):
    name, command, edits, raw, extra, message = case
    tmp, recipe, models = lab
    (tmp / "empty.jsonl").write_text("")
    (tmp / "blank.jsonl").write_text(json.dumps({"text": " "}) + "\n")
    for dotted, value in edits.items():
        if dotted == "_setup":
            value(tmp, models)
            continue
        if value == "BASE":
            value = recipe["base"]
        elif callable(value):
            value = value(tmp, models)
        set_path(recipe, dotted, value)
    path = tmp / "r.yaml"
    path.write_text(raw if raw is not None else yaml.safe_dump(recipe))
    result = cli(*_args(command, path, extra), code=None)
    assert result.exit_code in (1, 2), result.stdout
    assert message in error_line(result), result.stderr
    assert not untrusted_files(tmp / "ws")
    assert not (tmp / "out" / "ties" / "model.safetensors").exists()


def untrusted_files(ws: Path) -> list[Path]:
    """Files in the workspace that no manifest entry vouches for (a failed run must leave none)."""
    if not ws.exists():
        return []
    manifest = json.loads((ws / "manifest.json").read_text())["entries"] if (ws / "manifest.json").exists() else {}
    return [p for p in ws.rglob("*") if p.is_file() and p.name not in ("manifest.json", ".manifest.lock")
            and p.parent.name != "locks" and p.relative_to(ws).parts[1] not in manifest]


def _args(command: str, path: Path, extra: list[str]) -> list[str]:
    """Global options (--device) go before the command, the rest after the recipe."""
    if extra[:1] == ["--device"]:
        return [*extra, command, str(path)]
    return [command, str(path), *extra]


def test_debug_shows_the_traceback(lab):
    from mergecli.errors import MergeCliError

    tmp, recipe, _ = lab
    recipe["models"][0]["model"] = not_a_model(tmp, None)
    (tmp / "r.yaml").write_text(yaml.safe_dump(recipe))
    plain = cli("merge", tmp / "r.yaml", code=1)
    assert "neither a model" in error_line(plain) and isinstance(plain.exception, SystemExit)
    debug = cli("--debug", "merge", tmp / "r.yaml", code=1)
    assert isinstance(debug.exception, MergeCliError)


def test_disk_too_small_for_the_hessians_is_refused_before_writing(lab, monkeypatch):
    from collections import namedtuple

    import mergecli.engine.hessians as hessian_stage

    tmp, recipe, _ = lab
    (tmp / "r.yaml").write_text(yaml.safe_dump(recipe))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(hessian_stage.shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    result = cli("hessian", tmp / "r.yaml", code=1)
    assert "the workspace disk has" in error_line(result)
    assert not untrusted_files(tmp / "ws") and not list((tmp / "ws").glob("hessian/*"))
