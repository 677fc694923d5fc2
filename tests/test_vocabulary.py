"""The merged vocabulary (`tokenizer:` in a recipe, mergekit's tokenizer_source / tokenizer /
chat_template): rows re-mapped by token with mergekit's defaults, the tokenizer and config written,
shared rows merged as without it, chat templates, and what the recipe refuses.

mergekit's own outputs are compared in test_mergekit_slow.py (tokenizer-*.yml, frankenmerge-union.yml);
`mergekit_oracle.remap_rows` (mergekit's loops transcribed) checks the CLI's output in
test_mergekit_cli.py.
"""

import json
from pathlib import Path

import pytest
import torch

from helpers import cli, error_line, fine_tune, make_lora, make_llama, write_recipe
from mergecli.engine.vocabulary import Vocabulary
from mergecli.recipe.chat_templates import BUILT_IN
from mergecli.recipe.schema import TokenizerSpec
from mergekit_oracle import load_folder


def vocabulary(rows: dict[str, list[int]], tokens: dict | None = None, size: int = 5) -> Vocabulary:
    ids = {t: i for i, t in enumerate("abcde")}
    spec = TokenizerSpec.model_validate({"source": "union", "tokens": tokens or {}})
    originals = {"base": {"a": 0, "b": 1}, "x": {"b": 0, "c": 1, "a": 2}, "y": {"c": 0, "e": 1, "a": 2}}
    return Vocabulary(ids, size, {k: torch.tensor(v) for k, v in rows.items()}, originals, spec)


ROWS = {"base": [0, 1, -1, -1, -1], "x": [2, 0, 1, -1, -1], "y": [2, -1, 0, -1, 1]}


def tensors() -> dict[str, torch.Tensor]:
    return {"base": torch.tensor([[1.0, 1.0], [2.0, 2.0]]),
            "x": torch.tensor([[10.0, 0.0], [20.0, 0.0], [30.0, 0.0]]),
            "y": torch.tensor([[0.0, 5.0], [0.0, 6.0], [0.0, 7.0]])}


def test_rows_a_model_lacks_take_mergekits_defaults():
    out = vocabulary(ROWS).remap(tensors(), "embed")
    # a: everyone has it, own rows; b: base and x have it, y takes the base's; c: x and y (not the
    # base), the base takes their mean; d: nobody, zeros; e: only y, everyone takes y's
    assert out["base"].tolist() == [[1, 1], [2, 2], [10, 2.5], [0, 0], [0, 6]]
    assert out["x"].tolist() == [[30, 0], [10, 0], [20, 0], [0, 0], [0, 6]]
    assert out["y"].tolist() == [[0, 7], [2, 2], [0, 5], [0, 0], [0, 6]]


def test_configured_tokens_forced_other_tokens_zeros_and_padding():
    tokens = {"a": {"source": "x", "force": True}, "d": {"source": {"model": "y", "token": "e"}},
              "b": {"source": "zero"}}
    out = vocabulary(ROWS, tokens, size=8).remap(tensors(), "embed")
    assert out["base"][0].tolist() == [30, 0] and out["y"][0].tolist() == [30, 0]  # forced on every model
    assert out["x"][3].tolist() == [0, 6]  # d: y's row for e
    assert out["y"][1].tolist() == [0, 0]  # b: y lacks it and the entry says zeros (base and x keep theirs)
    assert out["base"][1].tolist() == [2, 2]
    mean = out["base"][:5].mean(dim=0)
    assert torch.equal(out["base"][5:], mean.expand(3, 2))  # padding: the model's mean token row
    with pytest.raises(Exception, match="tokenizer.tokens.d.source: y is not an input of tensor embed"):
        vocabulary(ROWS, tokens).remap({k: v for k, v in tensors().items() if k != "y"}, "embed")


def test_built_in_chat_templates_are_mergekits():
    assert set(BUILT_IN) == {"alpaca", "chatml", "exaone", "llama3", "mistral"}
    assert BUILT_IN["chatml"].startswith("{% for message in messages %}{{'<|im_start|>' + message['role']")


# -- the recipe ----------------------------------------------------------------------------------
@pytest.mark.parametrize("tokenizer, extra, message", [
    ({"tokens": {"<x>": {"source": "zero"}}}, {}, "tokenizer.tokens: needs a source"),
    ({"source": "union"}, {"extra_tokens": "base"}, "extra_tokens: give tokenizer.source or extra_tokens, not both"),
    ({"source": "c"}, {}, "tokenizer.source: 'c' is neither base, union nor a model of this recipe (a)"),
    ({"source": "union", "tokens": {"<x>": {"source": "c"}}}, {}, "tokenizer.tokens.<x>.source: 'c' is neither"),
    ({"source": "union", "tokens": {"<x>": {"source": {"model": "a"}}}}, {},
     "tokenizer.tokens.<x>.source.token: give token or token_id"),
    ({"chat_template": "chatm"}, {}, "tokenizer.chat_template: 'chatm' is neither a built-in template"),
    ({"chat_template": "chatml"}, {"merges": [{"name": "m", "method": "task_arithmetic", "output": "lora",
                                               "rank": 4}]}, "merges.0.output: a LoRA adapter keeps the base's"),
    ({"source": "base"}, {"merges": [{"name": "m", "method": "task_arithmetic", "lambda": "auto"}]},
     "merges.0.lambda: auto scores merges with the base's vocabulary"),
])
def test_a_bad_tokenizer_setting_is_one_line(tmp_path, tokenizer, extra, message):
    path = write_recipe(tmp_path / "r.yaml", "base", [{"name": "a", "model": "a", "dataset": {"path": "d"}}],
                        extra.pop("merges", [{"name": "m", "method": "task_arithmetic"}]), tokenizer=tokenizer,
                        **extra)
    assert message in error_line(cli("validate", path, code=2))


# -- end to end ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """A base, a fine-tune of it, one that added two chat tokens (98 rows) and a LoRA."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("vocabulary")
    make_llama(root / "base", seed=0, layers=2, tie=False)
    fine_tune(root / "base", root / "plain", seed=1)
    tokenizer = AutoTokenizer.from_pretrained(root / "base")
    tokenizer.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    model = AutoModelForCausalLM.from_pretrained(root / "base")
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(7)) * 0.02)
    model.save_pretrained(root / "chat")
    tokenizer.save_pretrained(root / "chat")
    make_lora(root / "base", root / "lora", seed=3)
    return root


def recipe_with(tmp_path, models, tokenizer, names=("plain", "chat", "lora"), **variant):
    return write_recipe(tmp_path / "r.yaml", str(models / "base"), [{"name": n, "model": str(models / n)}
                                                                    for n in names],
                        [{"name": "m", "method": "task_arithmetic", **variant}], tokenizer=tokenizer,
                        workspace=str(tmp_path / "ws"), output_dir=str(tmp_path / "out"))


def test_a_union_vocabulary_keeps_the_shared_rows_merge_and_adds_the_new_tokens(models, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    plain = recipe_with(tmp_path, models, None, names=("plain", "lora"))
    (without,) = json.loads(cli("--json", "merge", plain).stdout)
    without_rows = load_folder(Path(without["path"]))
    recipe = recipe_with(tmp_path, models, {"source": "union", "chat_template": "chatml",
                                            "tokens": {"<|tool|>": {"source": {"model": "chat", "token": "</s>"}}}})
    (result,) = json.loads(cli("--json", "merge", recipe).stdout)
    folder = Path(result["path"])
    tokenizer = AutoTokenizer.from_pretrained(folder)
    vocab = tokenizer.get_vocab()
    assert len(vocab) == 99 and {"<|im_start|>", "<|im_end|>", "<|tool|>"} <= set(vocab)
    assert json.loads((folder / "config.json").read_text())["vocab_size"] == 99
    assert tokenizer.chat_template == BUILT_IN["chatml"]
    out = load_folder(folder)
    base, chat = load_folder(models / "base"), load_folder(models / "chat")
    assert out["model.embed_tokens.weight"].shape == (99, 32)
    # a token only the chat model has: every input takes its row, so the merge keeps it
    new = vocab["<|im_start|>"]
    assert torch.allclose(out["model.embed_tokens.weight"][new], chat["model.embed_tokens.weight"][96], atol=1e-6)
    # <|tool|>: the chat model's row for </s> in every input
    assert torch.allclose(out["lm_head.weight"][vocab["<|tool|>"]], chat["lm_head.weight"][2], atol=1e-6)
    # shared tokens: the base's rows + each model's change, as a merge with the chat model's 96 rows would be
    tau_chat = chat["lm_head.weight"][:96] - base["lm_head.weight"]
    expected = without_rows["lm_head.weight"] + tau_chat
    assert torch.allclose(out["lm_head.weight"][:96], expected, atol=1e-6)
    messages = [{"role": "user", "content": "hi"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == "<|im_start|>user\nhi<|im_end|>\n"
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    generated = model.generate(**tokenizer("<|im_start|>user", return_tensors="pt"), max_new_tokens=3,
                               do_sample=False)
    assert generated.shape[1] >= 3
    (again,) = json.loads(cli("--json", "merge", recipe).stdout)
    assert again["reused"]
    (other,) = json.loads(cli("--json", "merge", recipe, "tokenizer.chat_template=llama3").stdout)
    assert not other["reused"] and other["key"] != result["key"]


def test_a_chat_template_alone_keeps_the_bases_rows(models, tmp_path):
    from transformers import AutoTokenizer

    template = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
    recipe = recipe_with(tmp_path, models, {"chat_template": template}, names=("plain",))
    (result,) = json.loads(cli("--json", "merge", recipe).stdout)
    tokenizer = AutoTokenizer.from_pretrained(result["path"])
    assert tokenizer.chat_template == template and len(tokenizer) == 96
    assert load_folder(Path(result["path"]))["model.embed_tokens.weight"].shape == (96, 32)


def test_without_a_tokenizer_setting_different_rows_are_refused(models, tmp_path):
    recipe = recipe_with(tmp_path, models, None, names=("chat",))
    assert "or tokenizer.source to re-map rows by token" in cli("merge", recipe, code=2).stderr
