"""taskvec -> merge end to end through the CLI, checked against independent computations."""

import json
import os
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from peft.utils import merge_utils
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import cli, digests, fine_tune, make_llama, make_lora, write_recipe





def state(folder: Path) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(folder)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture
def recipe(tmp_path, models):
    return write_recipe(tmp_path / "recipe.yaml", str(models / "base"),
                        [{"name": "a", "model": str(models / "ft_a")}, {"name": "b", "model": str(models / "ft_b")}],
                        [{"name": "ta", "method": "task_arithmetic", "lambda": 0.7},
                         {"name": "ties", "method": "ties", "density": 0.3},
                         {"name": "dare", "method": "dare_ties", "density": 0.4, "seed": 5}])


def taskvec_file(tmp_path: Path, model: str) -> Path:
    manifest = json.loads((tmp_path / "ws" / "manifest.json").read_text())
    key = next(k for k, e in manifest["entries"].items() if e["label"] == f"taskvec {model}")
    return tmp_path / "ws" / "taskvec" / key / "task_vector.safetensors"


def test_taskvec_is_finetune_minus_base_and_cached(tmp_path, models, recipe):
    from mergecli import load_recipe, run_taskvec

    first = cli("taskvec", recipe)
    assert "computed" in first.stderr and "read from the fine-tune at merge time" in first.stderr
    base, ft = state(models / "base"), state(models / "ft_a")
    computed = run_taskvec(load_recipe(recipe))[0]
    vector = computed.vector
    assert computed.reused and vector.by_reference
    assert "lm_head.weight" not in vector.names()  # tied: one task vector under the embedding's name
    assert sorted(vector.names()) == sorted(k for k in base if k != "lm_head.weight")
    for name in vector.names():
        assert torch.equal(vector.get(name, base[name]), ft[name] - base[name]), name
    # by reference: the workspace holds the tensor map, not a copy of the weights
    assert computed.artifact.size < 64 * 1024
    second = cli("--json", "taskvec", recipe)
    assert all(row["reused"] for row in json.loads(second.stdout))


def lora_vector_and_reference(tmp_path: Path, base_dir: Path, adapter_dir: Path):
    """Our task vector of an adapter, and the reference: peft's merge_and_unload() minus the base."""
    recipe = write_recipe(tmp_path / "r.yaml", str(base_dir), [{"name": "l", "model": str(adapter_dir)}], [])
    cli("taskvec", recipe)
    base = state(base_dir)
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir),
                                       adapter_dir).merge_and_unload().state_dict()
    return load_file(taskvec_file(tmp_path, "l")), {k: merged[k] - base[k] for k in base}


def test_lora_task_vector_equals_peft_merge_and_unload(tmp_path, models):
    tv, reference = lora_vector_and_reference(tmp_path, models / "base", models / "lora_c")
    assert sorted(tv) == sorted(k for k in reference if k.endswith(("q_proj.weight", "v_proj.weight")))
    for name, delta in tv.items():
        assert torch.allclose(delta, reference[name], atol=1e-6), name


def test_lora_fan_in_fan_out_rslora_and_alpha_pattern_on_gpt2(tmp_path):
    """GPT-2's Conv1D (in x out): peft forces fan_in_fan_out; the delta must still match peft."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=64,
                               bos_token_id=0, eos_token_id=0)).eval().save_pretrained(tmp_path / "g")
    make_lora(tmp_path / "g", tmp_path / "gl", seed=1, targets=("c_attn", "c_fc"), fan_in_fan_out=True,
              use_rslora=True, alpha_pattern={"c_fc": 16})
    tv, reference = lora_vector_and_reference(tmp_path, tmp_path / "g", tmp_path / "gl")
    assert len(tv) == 4
    for name, delta in tv.items():
        assert delta.shape == reference[name].shape
        assert torch.allclose(delta, reference[name], atol=1e-6), name


def test_merge_outputs_load_generate_and_equal_independent_math(tmp_path, models, recipe):
    result = cli("--json", "merge", recipe)
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert set(rows) == {"ta", "ties", "dare"}
    base, a, b = (state(models / n) for n in ("base", "ft_a", "ft_b"))
    taus = {n: [a[n] - base[n], b[n] - base[n]] for n in base}

    ta = state(tmp_path / "out" / "ta")
    for name in base:
        assert torch.allclose(ta[name], base[name] + 0.7 * (taus[name][0] + taus[name][1]), atol=1e-6), name

    ties = state(tmp_path / "out" / "ties")
    for name in base:  # peft's ties == ours for unit weights; peft keeps int(d*n), we keep round(d*n)
        n = base[name].numel()
        if int(0.3 * n) == round(0.3 * n):
            expected = base[name] + merge_utils.ties(taus[name], torch.ones(2), density=0.3)
            assert torch.allclose(ties[name], expected, atol=1e-6), name

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "dare")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    tok = AutoTokenizer.from_pretrained(tmp_path / "out" / "dare")
    ids = tok("def add(a, b):", return_tensors="pt")
    generated = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] == ids["input_ids"].shape[1] + 5
    assert 0.0 < rows["ties"]["kept_density"] < 1.0
    card = (tmp_path / "out" / "ties" / "README.md").read_text()
    assert "method `ties`" in card and (tmp_path / "out" / "ties" / "mergecli_recipe.yaml").is_file()


def test_dare_result_does_not_depend_on_which_variants_run_or_their_order(tmp_path, models, recipe):
    cli("merge", recipe, "--only", "dare")
    first = load_file(tmp_path / "out" / "dare" / "model.safetensors")
    cli("merge", recipe, "--only", "aaa", "--only", "dare2", "merges.dare.name=dare2", "merges.ties.name=aaa")
    second = load_file(tmp_path / "out" / "dare2" / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    cli("merge", recipe, "--only", "dare3", "merges.dare.seed=6", "merges.dare.name=dare3")
    third = load_file(tmp_path / "out" / "dare3" / "model.safetensors")
    assert not torch.equal(first["model.layers.0.mlp.up_proj.weight"], third["model.layers.0.mlp.up_proj.weight"])


def test_second_merge_is_reused_and_a_changed_input_is_recomputed(tmp_path, models, recipe):
    cli("merge", recipe, "--only", "ta")
    at_07 = load_file(tmp_path / "out" / "ta" / "model.safetensors")
    again = cli("merge", recipe, "--only", "ta")
    assert "merge ta: reused" in again.stderr
    changed = cli("merge", recipe, "--only", "ta", "merges.ta.lambda=0.5")
    assert "merge ta: wrote" in changed.stderr
    at_05 = load_file(tmp_path / "out" / "ta" / "model.safetensors")
    base, a, b = state(models / "base"), state(models / "ft_a"), state(models / "ft_b")
    name = "model.layers.0.mlp.up_proj.weight"
    for merged, lam in ((at_07, 0.7), (at_05, 0.5)):  # each is base + lambda * (tau_a + tau_b), as asked
        expected = base[name] + lam * ((a[name] - base[name]) + (b[name] - base[name]))
        assert torch.allclose(merged[name], expected, atol=1e-6)


def test_fine_tune_rewritten_on_disk_invalidates_its_task_vector(tmp_path, models):
    fine_tune(models / "base", tmp_path / "ft", seed=11)
    recipe = write_recipe(tmp_path / "r.yaml", str(models / "base"), [{"name": "x", "model": str(tmp_path / "ft")}],
                          [{"name": "m", "method": "task_arithmetic"}])
    cli("merge", recipe)
    fine_tune(models / "base", tmp_path / "ft", seed=12)
    weights = tmp_path / "ft" / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    rerun = cli("merge", recipe)
    assert "computed" in rerun.stderr and "reused" not in rerun.stderr.split("merge m")[-1]
    merged, ft = state(tmp_path / "out" / "m"), state(tmp_path / "ft")
    assert torch.allclose(merged["model.norm.weight"], ft["model.norm.weight"], atol=1e-6)


def test_mixed_full_lora_sharded_and_bin_inputs_with_bf16_sharded_output(tmp_path, models):
    fine_tune(models / "base", tmp_path / "sharded", seed=21, shard_size="30KB")
    fine_tune(models / "base", tmp_path / "bin", seed=22, as_bin=True)
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    recipe = write_recipe(tmp_path / "r.yaml", str(models / "base"),
                          [{"name": "s", "model": str(tmp_path / "sharded")}, {"name": "b", "model": str(tmp_path / "bin")},
                           {"name": "l", "model": str(models / "lora_c"), "weight": 0.5}],
                          [{"name": "ta", "method": "task_arithmetic", "dtype": "bfloat16"}], shard_size="40KB")
    cli("merge", recipe)
    out = tmp_path / "out" / "ta"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    model = AutoModelForCausalLM.from_pretrained(out)
    assert next(model.parameters()).dtype == torch.bfloat16
    base, s, b = state(models / "base"), state(tmp_path / "sharded"), state(tmp_path / "bin")
    lora = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(models / "base"),
                                     models / "lora_c").merge_and_unload().state_dict()
    name = "model.layers.1.self_attn.q_proj.weight"
    expected = base[name] + (s[name] - base[name]) + (b[name] - base[name]) + 0.5 * (lora[name] - base[name])
    assert torch.allclose(model.state_dict()[name].float(), expected.to(torch.bfloat16).float())


def test_an_output_folder_mergecli_did_not_write_is_never_replaced(tmp_path, recipe):
    (tmp_path / "out" / "ta").mkdir(parents=True)
    (tmp_path / "out" / "ta" / "precious.txt").write_text("keep me")
    for extra in ([], ["--overwrite"]):
        refused = cli("merge", recipe, "--only", "ta", *extra, code=1)
        assert "not written by mergecli; it is left untouched" in refused.stderr
        assert (tmp_path / "out" / "ta" / "precious.txt").read_text() == "keep me"
        assert "task vector" not in refused.stderr  # refused before any work
    (tmp_path / "out" / "ta" / "precious.txt").unlink()  # an empty folder is free to use
    cli("merge", recipe, "--only", "ta")
    assert (tmp_path / "out" / "ta" / "mergecli.json").is_file()
    (tmp_path / "out" / "ta" / "notes.txt").write_text("mine")  # our folder, with a file of the user's in it
    refused = cli("merge", recipe, "--only", "ta", "--overwrite", code=1)
    assert "holds files mergecli did not write (notes.txt)" in refused.stderr
    assert (tmp_path / "out" / "ta" / "notes.txt").read_text() == "mine"


def test_a_missing_weight_is_refused_and_a_stray_buffer_is_not_a_weight(tmp_path, models):
    """A fine-tune without one of the model's weights cannot be merged (named in the error); a
    tensor that is no parameter of the model (an old checkpoint's buffer) is not a weight to merge."""
    from safetensors.torch import save_file

    fine_tune(models / "base", tmp_path / "ft", seed=5)
    weights = tmp_path / "ft" / "model.safetensors"
    tensors = load_file(weights)
    gone = "model.layers.1.mlp.up_proj.weight"
    save_file({k: v for k, v in tensors.items() if k != gone}, weights, metadata={"format": "pt"})
    recipe = write_recipe(tmp_path / "r.yaml", str(models / "base"), [{"name": "f", "model": str(tmp_path / "ft")}],
                          [{"name": "m", "method": "task_arithmetic"}])
    assert f"f does not match the base: missing in the fine-tune: {gone}" in cli("merge", recipe, code=2).stderr
    stray = {**tensors, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)}
    save_file(stray, weights, metadata={"format": "pt"})
    cli("merge", recipe)
    merged = load_file(tmp_path / "out" / "m" / "model.safetensors")
    assert "model.layers.0.self_attn.rotary_emb.inv_freq" not in merged and gone in merged


def test_shape_mismatch_names_tensor_and_shapes(tmp_path, models):
    make_llama(tmp_path / "other", seed=0, vocab_size=100)
    recipe = write_recipe(tmp_path / "r.yaml", str(models / "base"), [{"name": "o", "model": str(tmp_path / "other")}],
                          [{"name": "m", "method": "ties"}])
    result = cli("merge", recipe, code=2)
    assert "o does not match the base" in result.stderr
    assert "model.embed_tokens.weight: shape [100, 32] in the fine-tune, [96, 32] in the base (added tokens? set extra_tokens" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def test_architecture_mismatch_is_refused(tmp_path, models):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=96, bos_token_id=0,
                               eos_token_id=0)).save_pretrained(tmp_path / "gpt2")
    recipe = write_recipe(tmp_path / "r.yaml", str(models / "base"), [{"name": "g", "model": str(tmp_path / "gpt2")}], [])
    result = cli("taskvec", recipe, code=2)
    assert "architecture 'gpt2' does not match the base's 'llama'" in result.stderr


def test_lora_for_another_base_is_refused_unless_overridden(tmp_path, models):
    make_llama(tmp_path / "elsewhere", seed=5)
    make_lora(tmp_path / "elsewhere", tmp_path / "lora", seed=1)
    recipe = write_recipe(tmp_path / "r.yaml", str(models / "base"), [{"name": "l", "model": str(tmp_path / "lora")}], [])
    result = cli("taskvec", recipe, code=2)
    assert "adapter was trained on" in result.stderr and "check_base" in result.stderr
    cli("taskvec", recipe, "models.l.check_base=false")


def test_peak_memory_does_not_grow_with_depth(tmp_path):
    """The merge streams: 4x the layers must not raise peak RSS by more than 30%."""
    import subprocess
    import sys
    import textwrap

    peaks = []
    for layers in (2, 8):
        root = tmp_path / f"L{layers}"
        script = textwrap.dedent(f"""
            import resource, sys, torch
            sys.path.insert(0, {str(Path(__file__).parent)!r})
            from pathlib import Path
            from helpers import write_recipe
            from safetensors.torch import save_file
            from transformers import LlamaConfig
            from mergecli import load_recipe, run_merge
            root = Path({str(root)!r})
            cfg = LlamaConfig(vocab_size=512, hidden_size=384, intermediate_size=1024, num_hidden_layers={layers},
                              num_attention_heads=6, num_key_value_heads=6)
            from transformers import LlamaForCausalLM
            with torch.device("meta"):
                shapes = {{n: p.shape for n, p in LlamaForCausalLM(cfg).named_parameters()}}
            for name, seed in (("base", 0), ("a", 1), ("b", 2)):
                (root / name).mkdir(parents=True)
                cfg.save_pretrained(root / name)
                g = torch.Generator().manual_seed(seed)
                save_file({{n: torch.randn(s, generator=g) for n, s in shapes.items()}}, root / name / "model.safetensors",
                          metadata={{"format": "pt"}})
            write_recipe(root / "r.yaml", "./base", [{{"model": "./a"}}, {{"model": "./b"}}],
                         [{{"name": "t", "method": "ties"}}])
            recipe = load_recipe(root / "r.yaml")
            from mergecli import run_taskvec
            run_taskvec(recipe)
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            run_merge(recipe)
            print(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        """)
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
        peaks.append(int(out.stdout.split()[-1]))
    assert peaks[1] < 1.3 * peaks[0], peaks


@pytest.mark.parametrize("rule", ["base", "union"])
def test_fine_tune_with_added_tokens_follows_the_extra_tokens_rule(tmp_path, models, rule):
    """A fine-tune that resized its embeddings (4 added tokens): shared rows are merged; the extra
    rows are dropped (base) or taken from that fine-tune with its tokenizer (union)."""
    grown = AutoModelForCausalLM.from_pretrained(models / "ft_a")
    tok = AutoTokenizer.from_pretrained(models / "base")
    tok.add_tokens(["<t1>", "<t2>", "<t3>", "<t4>"])
    grown.resize_token_embeddings(len(tok))
    with torch.no_grad():
        grown.model.embed_tokens.weight[-4:] = torch.arange(4 * 32, dtype=torch.float32).reshape(4, 32)
    grown.save_pretrained(tmp_path / "grown")
    tok.save_pretrained(tmp_path / "grown")
    recipe = write_recipe(tmp_path / "r.yaml", str(models / "base"),
                          [{"name": "g", "model": str(tmp_path / "grown")}, {"name": "b", "model": str(models / "ft_b")}],
                          [{"name": "ta", "method": "task_arithmetic"}], extra_tokens=rule)
    cli("merge", recipe)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "ta")
    base, b = state(models / "base"), state(models / "ft_b")
    emb = merged.model.embed_tokens.weight.detach()
    name = "model.embed_tokens.weight"
    shared = base[name] + (grown.state_dict()[name][:96] - base[name]) + (b[name] - base[name])
    assert torch.allclose(emb[:96], shared, atol=1e-6)
    if rule == "base":
        assert emb.shape[0] == 96 and len(AutoTokenizer.from_pretrained(tmp_path / "out" / "ta")) == 96
    else:
        assert emb.shape[0] == 100 and merged.config.vocab_size == 100
        assert torch.equal(emb[96:], torch.arange(4 * 32, dtype=torch.float32).reshape(4, 32))
        assert len(AutoTokenizer.from_pretrained(tmp_path / "out" / "ta")) == 100
        assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()


def test_half_precision_inputs_keep_their_dtype_unless_overridden(tmp_path, models):
    for name in ("base", "ft_a"):
        AutoModelForCausalLM.from_pretrained(models / name, dtype=torch.bfloat16).save_pretrained(tmp_path / name)
    AutoTokenizer.from_pretrained(models / "base").save_pretrained(tmp_path / "base")
    recipe = write_recipe(tmp_path / "r.yaml", "./base", [{"model": "./ft_a"}], [{"name": "ta", "method": "task_arithmetic"}])
    cli("merge", recipe)
    merged = load_file(tmp_path / "out" / "ta" / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in merged.values())
    cli("merge", recipe, "--dtype", "float16")
    assert all(t.dtype == torch.float16 for t in load_file(tmp_path / "out" / "ta" / "model.safetensors").values())
    assert json.loads((tmp_path / "out" / "ta" / "config.json").read_text())["dtype"] == "float16"


def test_hub_ids_resolve_through_the_local_hub_cache_offline(tmp_path, models, monkeypatch):
    """The real huggingface_hub path: a cached snapshot is used offline, pinned by @revision."""
    hub = tmp_path / "hf" / "hub" / "models--someorg--tiny-base"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = hub / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in (models / "base").iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (hub / "refs").mkdir()
    (hub / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    import huggingface_hub.constants as hc
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    recipe = write_recipe(tmp_path / "r.yaml", "someorg/tiny-base@main", [{"name": "a", "model": str(models / "ft_a")}],
                          [{"name": "ta", "method": "task_arithmetic"}])
    result = cli("--json", "taskvec", recipe)
    assert json.loads(result.stdout)[0]["tensors"] > 0
    missing = cli("taskvec", recipe, "base=someorg/tiny-base@v9", code=1)
    assert "cannot get someorg/tiny-base@v9 from the Hugging Face hub" in missing.stderr


def test_lora_modules_to_save_and_embedding_lora_match_peft(tmp_path):
    """Untied model: lm_head saved whole (modules_to_save) gives saved - base; embedding LoRA too."""
    from helpers import make_tokenizer
    from helpers import tiny_config

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("mistral")).eval().save_pretrained(tmp_path / "m")
    make_tokenizer(tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"],
                                                  modules_to_save=["lm_head"], init_lora_weights=False))
    with torch.no_grad():
        peft_model.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.5)
    peft_model.save_pretrained(tmp_path / "adapter")
    tv, reference = lora_vector_and_reference(tmp_path, tmp_path / "m", tmp_path / "adapter")
    assert {"lm_head.weight", "model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"} <= set(tv)
    assert torch.allclose(tv["lm_head.weight"], torch.full_like(tv["lm_head.weight"], 0.5), atol=1e-6)
    for name, delta in tv.items():
        assert torch.allclose(delta, reference[name], atol=1e-5), name


def test_a_gguf_file_is_a_base_model(tmp_path, models, monkeypatch):
    """A .gguf reference is dequantized once (cached), equals transformers' own GGUF loading, and
    merges like any folder."""
    from helpers import make_gguf

    monkeypatch.setenv("MERGECLI_CACHE", str(tmp_path / "cache"))
    make_gguf(models / "base", tmp_path / "tiny.gguf")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf").state_dict()
    ft = AutoModelForCausalLM.from_pretrained(models / "base")  # same architecture, no gguf quantization tag
    ft.load_state_dict({k: v + 0.01 for k, v in loaded.items()}, strict=False)
    ft.save_pretrained(tmp_path / "ft")
    recipe = write_recipe(tmp_path / "r.yaml", "./tiny.gguf", [{"name": "f", "model": "./ft"}],
                          [{"name": "ta", "method": "task_arithmetic", "lambda": 0.5}])
    cli("merge", recipe)
    converted = next((tmp_path / "cache" / "gguf").iterdir())
    assert all(torch.equal(state(converted)[k], loaded[k]) for k in loaded)
    merged = state(tmp_path / "out" / "ta")
    assert all(torch.allclose(merged[k], loaded[k] + 0.005, atol=1e-6) for k in loaded)
    again = cli("merge", recipe)
    assert "reused" in again.stderr and len(list((tmp_path / "cache" / "gguf").iterdir())) == 1
    # a folder at the cache's name that mergecli did not mark (an older version's) is left alone
    (converted / ".mergecli-owned").unlink()
    before = digests(converted)
    cli("merge", recipe, "--overwrite")
    assert digests(converted) == before
    assert len(list((tmp_path / "cache" / "gguf").iterdir())) == 2


def test_the_number_of_workers_does_not_change_a_single_byte(tmp_path, models, recipe):
    cli("merge", recipe, "--workers", "1")
    one = {m: (tmp_path / "out" / m / "model.safetensors").read_bytes() for m in ("ta", "ties", "dare")}
    cli("merge", recipe, "--workers", "3", "--overwrite", "output_dir=out3")
    for m, data in one.items():
        assert (tmp_path / "out3" / m / "model.safetensors").read_bytes() == data, m
    assert "greater than or equal to 1" in cli("merge", recipe, "--workers", "0", code=2).stderr
