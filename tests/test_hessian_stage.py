"""The hessian stage end to end: hooks against captured inputs, groups, layer-by-layer, CLI, errors."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import CODE, VERSE, cli, write_jsonl, write_recipe
from mergecli.engine.calibration import make_windows, spread_windows
from mergecli.engine.collect import collect, find_groups, linear_modules





@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_jsonl(root / "code.jsonl", CODE)
    (root / "verse.txt").write_text("\n".join(VERSE))
    (root / "chat.jsonl").write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": t}]})
                                               for t in VERSE[:10]))
    return root


def captured_grams(model, windows):
    """Reference: keep every linear input explicitly, then X^T X over non-pad tokens."""
    inputs: dict[str, list[torch.Tensor]] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=name: inputs.setdefault(n, []).append(a[0].detach()))
             for name, m in linear_modules(model).items()]
    with torch.no_grad():
        model(input_ids=windows.input_ids, attention_mask=windows.attention_mask, use_cache=False)
    for h in hooks:
        h.remove()
    keep = windows.attention_mask.reshape(-1).bool()
    out = {}
    for name, xs in inputs.items():
        x = torch.cat(xs).reshape(-1, xs[0].shape[-1])[keep].double()
        out[name] = x.T @ x
    return out, inputs


@pytest.fixture
def tiny(models):
    model = AutoModelForCausalLM.from_pretrained(models / "ft_a").eval()
    tok = AutoTokenizer.from_pretrained(models / "base")
    windows = make_windows(["x = 1", "def add(a, b):", "hello", VERSE[0], VERSE[1], CODE[0]], tok, samples=6,
                           seq_len=24, seed=0, pack=False)
    assert (windows.attention_mask == 0).any()  # padding present, and it must not count
    return model, windows


def test_hooked_statistics_equal_xtx_of_captured_inputs_and_groups_share_inputs(tiny):
    model, windows = tiny
    groups = find_groups(model, windows.input_ids)
    stats = collect(model, windows, groups, batch_size=4, device=torch.device("cpu"))
    reference, inputs = captured_grams(model, windows)
    layer = "model.layers.1"
    assert sorted(groups[f"{layer}.self_attn.q_proj"]) == sorted(f"{layer}.self_attn.{p}_proj" for p in "qkv")
    assert sorted(groups[f"{layer}.mlp.gate_proj"]) == [f"{layer}.mlp.gate_proj", f"{layer}.mlp.up_proj"]
    assert groups[f"{layer}.self_attn.o_proj"] == [f"{layer}.self_attn.o_proj"]
    for leader, members in groups.items():
        assert torch.allclose(stats.sums[leader].double(), reference[leader], rtol=1e-4, atol=1e-4), leader
        assert stats.counts[leader] == windows.tokens
        for member in members:  # members really saw the same input
            assert stats.members[f"{member}.weight"] == leader
            assert torch.equal(inputs[member][0], inputs[leader][0])
    assert "lm_head" not in stats.members


def test_layer_by_layer_equals_whole_model(tiny):
    """The block-streamed runner (the model never loaded) finds the same groups and the same H."""
    from mergecli.engine.collect import collect_blocks, find_block_groups
    from mergecli.engine.streamed import StreamedModel, model_weights

    model, windows = tiny
    groups = find_groups(model, windows.input_ids)
    runner, weights = StreamedModel(model.config), model_weights(model)
    block_groups, dims = find_block_groups(runner, weights, windows.input_ids)
    assert block_groups == groups and set(dims) == set(groups)
    whole = collect(model, windows, groups, 4, torch.device("cpu"))
    layered = collect_blocks(runner, weights, windows, groups, dims, 4)
    assert whole.sums.keys() == layered.sums.keys() and whole.members == layered.members
    for name in whole.sums:
        assert torch.allclose(whole.sums[name], layered.sums[name], rtol=1e-5, atol=1e-5), name
        assert whole.counts[name] == layered.counts[name]


def recipe_with_data(tmp_path, models, data, merges, **extra):
    return write_recipe(tmp_path / "r.yaml", str(models / "base"), [
        {"name": "a", "model": str(models / "ft_a"), "dataset": {"path": str(data / "code.jsonl")}},
        {"name": "b", "model": str(models / "ft_b"), "dataset": {"path": str(data / "verse.txt")}},
        {"name": "c", "model": str(models / "lora_c"), "dataset": {"path": str(data / "verse.txt")}},
    ], merges, calibration={"samples": 4, "seq_len": 16, "batch_size": 2}, **extra)


def test_hessian_cli_caches_reports_size_and_feeds_activation_aware_merges(tmp_path, models, data):
    merges = [{"name": "sg", "method": "ties", "score": "sparsegpt"},
              {"name": "wanda", "method": "dare_ties", "score": "wanda"},
              {"name": "obs", "method": "task_arithmetic_topk", "score": "sparsegpt", "compensate": True},
              {"name": "regmean", "method": "regmean", "alpha": 0.8}]
    recipe = recipe_with_data(tmp_path, models, data, merges)
    first = cli("hessian", recipe)
    assert "MiB on disk" in first.stderr and first.stderr.count("collected") == 3
    rows = json.loads(cli("--json", "hessian", recipe).stdout)
    assert all(r["reused"] and r["tokens"] == 64 and r["groups"] == 8 for r in rows)
    merged = json.loads(cli("--json", "merge", recipe).stdout)
    assert {r["name"] for r in merged} == {"sg", "wanda", "obs", "regmean"}
    for name in ("sg", "wanda", "obs", "regmean"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / name)
        out = model(input_ids=torch.tensor([[1, 5, 9, 12]]))
        assert torch.isfinite(out.logits).all()
    sg = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "sg").state_dict()
    base = AutoModelForCausalLM.from_pretrained(models / "base").state_dict()
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(sg[name], base[name])


def test_embedding_token_counts_are_stored_and_regmean_merges_embedding_rows_by_them(tmp_path, models, data):
    from safetensors.torch import load_file

    from mergecli.engine.calibration import load_texts
    from mergecli.recipe.schema import DatasetSpec

    recipe = recipe_with_data(tmp_path, models, data, [{"name": "rm", "method": "regmean"},
                                                       {"name": "rm-mean", "method": "regmean", "embedding": "mean"}])
    rows = {r["model"]: r for r in json.loads(cli("--json", "hessian", recipe).stdout)}
    tok = AutoTokenizer.from_pretrained(models / "base")
    emb = "model.embed_tokens.weight"
    freqs = {}
    for name, path in (("a", data / "code.jsonl"), ("b", data / "verse.txt")):
        stored = load_file(Path(rows[name]["path"]) / "hessian.safetensors")[f"{emb}.counts"]
        texts = load_texts(DatasetSpec(path=str(path)), tmp_path, tok)
        reference, packed = (hand_counts(w, stored.shape[0]) for w in
                             (spread_windows(texts, tok, 4, 16, 0), make_windows(texts, tok, 4, 16, 0)))
        assert torch.equal(stored, reference) and int(stored.sum()) == rows[name]["tokens"]
        assert not torch.equal(stored, packed)  # the windows are spread one per document, not packed
        freqs[name] = stored.double() / stored.sum()
    cli("merge", recipe)
    base = AutoModelForCausalLM.from_pretrained(models / "base").state_dict()[emb].double()
    taus = {n: AutoModelForCausalLM.from_pretrained(models / f"ft_{n}").state_dict()[emb].double() - base
            for n in "ab"}  # the LoRA c does not touch the embedding: it is absent there
    merged = {v: AutoModelForCausalLM.from_pretrained(tmp_path / "out" / v).state_dict()[emb].double() - base
              for v in ("rm", "rm-mean")}
    for v in range(base.shape[0]):  # row by row: RegMean of a one-hot input
        c = torch.tensor([freqs["a"][v], freqs["b"][v]])
        expected = (c[0] * taus["a"][v] + c[1] * taus["b"][v]) / c.sum() if c.sum() > 0 else \
            (taus["a"][v] + taus["b"][v]) / 2
        assert torch.allclose(merged["rm"][v], expected, atol=1e-6), v
    assert torch.allclose(merged["rm-mean"], (taus["a"] + taus["b"]) / 2, atol=1e-6)
    assert (freqs["a"] > 0).sum() < base.shape[0]  # some rows unseen: the fallback is exercised


def hand_counts(windows, rows: int) -> torch.Tensor:
    """How often each token id is an unpadded position of the windows, counted one by one."""
    counts = torch.zeros(rows, dtype=torch.int64)
    for token in windows.input_ids[windows.attention_mask.bool()].tolist():
        counts[token] += 1
    return counts


def test_different_calibration_settings_are_different_cache_entries(tmp_path, models, data):
    recipe = recipe_with_data(tmp_path, models, data, [])
    cli("hessian", recipe)
    again = cli("hessian", recipe, "--samples", "5")
    assert again.stderr.count("collected") == 3
    layered = cli("--json", "hessian", recipe, "--layer-by-layer")  # same key: mode does not change H
    assert all(r["reused"] for r in json.loads(layered.stdout))


def test_chat_messages_are_rendered_with_the_chat_template(tmp_path, models, data):
    from mergecli.engine.calibration import load_texts
    from mergecli.recipe.schema import DatasetSpec

    tok = AutoTokenizer.from_pretrained(models / "base")
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    texts = load_texts(DatasetSpec(path=str(data / "chat.jsonl"), messages_field="messages"), tmp_path, tok)
    assert len(texts) == 9 and texts[0].startswith("<user>Shall I compare")  # 1 of 10 held out for eval


@pytest.mark.parametrize("dataset,calibration,message", [
    ({"path": "./nowhere.jsonl"}, {}, "no such file or folder"),
    ({"path": "CODE", "text_field": "body"}, {}, "has no column 'body' (columns: text)"),
    ({"path": "CODE"}, {"samples": 500, "seq_len": 64}, "windows of 64 need 32000"),
    ({"path": "CODE"}, {"samples": 500, "pack": False}, "--samples 500 needs as many"),
    ({"path": "some-org/some-dataset-that-is-not-cached"}, {}, "cannot load dataset some-org/"),
])
def test_bad_calibration_data_is_a_clear_error(tmp_path, models, data, dataset, calibration, message):
    dataset = {k: (str(data / "code.jsonl") if v == "CODE" else v) for k, v in dataset.items()}
    recipe = write_recipe(tmp_path / "r.yaml", str(models / "base"),
                          [{"name": "a", "model": str(models / "ft_a"), "dataset": dataset}], [],
                          calibration={"samples": 4, "seq_len": 16, **calibration})
    result = cli("hessian", recipe, code=1)
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not list((tmp_path / "ws").glob("hessian/*"))


def test_merge_needing_statistics_without_a_dataset_is_a_recipe_error(tmp_path, models):
    recipe = write_recipe(tmp_path / "r.yaml", str(models / "base"), [{"name": "a", "model": str(models / "ft_a")}],
                          [{"name": "sg", "method": "ties", "score": "sparsegpt"}])
    result = cli("validate", recipe, code=2)
    assert "models.0.dataset: required by merge 'sg'" in result.stderr


def test_gpt2_conv1d_statistics_use_input_dimensions(tmp_path, data):
    from transformers import GPT2Config, GPT2LMHeadModel

    from helpers import make_tokenizer

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=96, n_positions=64,
                               bos_token_id=1, eos_token_id=2)).eval().save_pretrained(tmp_path / "g")
    make_tokenizer(tmp_path / "g")
    ft = GPT2LMHeadModel.from_pretrained(tmp_path / "g")
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(0.01 * torch.randn_like(p))
    ft.save_pretrained(tmp_path / "gft")
    recipe = write_recipe(tmp_path / "r.yaml", str(tmp_path / "g"),
                          [{"name": "x", "model": str(tmp_path / "gft"), "dataset": {"path": str(data / "code.jsonl")}}],
                          [{"name": "sg", "method": "ties", "score": "sparsegpt", "topk": "row"}],
                          calibration={"samples": 2, "seq_len": 16})
    cli("merge", recipe)
    meta = json.loads(next((tmp_path / "ws" / "hessian").glob("*/hessian.json")).read_text())
    assert meta["groups"]["transformer.h.0.mlp.c_proj"] == ["transformer.h.0.mlp.c_proj"]
    from safetensors import safe_open

    with safe_open(str(next((tmp_path / "ws" / "hessian").glob("*/hessian.safetensors"))), "pt") as f:
        assert f.get_slice("transformer.h.0.mlp.c_proj.H").get_shape() == [128, 128]  # c_proj input is 4*32
        assert f.get_slice("transformer.h.0.attn.c_attn.H").get_shape() == [32, 32]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "sg").state_dict()
    base = GPT2LMHeadModel.from_pretrained(tmp_path / "g").state_dict()
    kept = (merged["transformer.h.0.mlp.c_fc.weight"] != base["transformer.h.0.mlp.c_fc.weight"])
    assert torch.all(kept.sum(dim=0) == round(0.2 * 32))  # per output row = per column of the in x out Conv1D
