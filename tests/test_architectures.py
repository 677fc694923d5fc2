"""Every supported architecture end to end: full fine-tune + LoRA -> taskvec -> hessian -> merge ->
eval -> from_pretrained + generate, on tiny configs built locally."""

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from helpers import CODE, TINY_CONFIGS, cli, make_tokenizer, tiny_config, write_jsonl, write_recipe



def lora_targets(model) -> list[str]:
    """Every linear-ish leaf module name suffix inside the decoder blocks (for LoRA)."""
    from transformers.pytorch_utils import Conv1D

    names = {n.split(".")[-1] for n, m in model.named_modules()
             if isinstance(m, (torch.nn.Linear, Conv1D)) and m is not model.get_output_embeddings()}
    return sorted(names)


def architecture_row(model) -> dict:
    """What mergecli reads off a model instance, in the form of `mergecli archs`' table."""
    import re

    from mergecli.engine.collect import find_groups
    from mergecli.models.architecture import describe_model

    arch = describe_model(model)
    groups = find_groups(model, torch.tensor([[1, 5, 9, 12, 7, 4, 8, 10]]))

    def block(names) -> list[str]:
        return sorted({re.sub(r"\.experts\.\d+\.", ".experts.*.", re.sub(r"^.*?\.\d+\.", "", n))
                       for n in names if re.search(r"\.0\.", n)})

    experts = [n for n in arch.sliced if arch.is_linear(n)]  # one expert's projection, as the files store it

    shared = [block(m) for m in groups.values() if any(".0." in n for n in m)]
    return {"model_type": model.config.model_type, "class": type(model).__name__,
            "linear weights per block": ", ".join(n.removesuffix(".weight") for n in block([*arch.linear, *experts])),
            "shared input groups": "; ".join("+".join(g) for g in shared if len(g) > 1) or "-",
            "stored in x out": ", ".join(n.removesuffix(".weight") for n in block(arch.transposed)) or "-",
            "tied embeddings by default": bool(type(model.config)().tie_word_embeddings)}


def test_the_architecture_table_is_what_the_classes_say():
    """`mergecli archs` prints a static table (instantly); it must equal what is read off each class."""
    from mergecli.models.architectures import TESTED

    assert [a.model_type for a in TESTED] == list(TINY_CONFIGS)
    for row in TESTED:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_config(row.model_type)).eval()
        assert row.row() == architecture_row(model), row.model_type


@pytest.mark.parametrize("model_type", list(TINY_CONFIGS))
def test_architecture_end_to_end(tmp_path, model_type):
    torch.manual_seed(0)
    config = tiny_config(model_type)
    base = AutoModelForCausalLM.from_config(config).eval()
    base.save_pretrained(tmp_path / "base")
    make_tokenizer(tmp_path / "base", vocab_size=96)
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    with torch.no_grad():
        for p in full.parameters():
            p.add_(0.02 * torch.randn_like(p))
    full.save_pretrained(tmp_path / "full")
    lora_base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    targets = lora_targets(lora_base)
    peft_model = get_peft_model(lora_base, LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                      init_lora_weights=False, fan_in_fan_out=model_type == "gpt2"))
    peft_model.save_pretrained(tmp_path / "lora")
    write_jsonl(tmp_path / "code.jsonl", CODE)
    recipe = write_recipe(tmp_path / "r.yaml", str(tmp_path / "base"), [
        {"name": "full", "model": "./full", "dataset": {"path": "./code.jsonl"}},
        {"name": "lora", "model": "./lora", "dataset": {"path": "./code.jsonl"}, "check_base": False},
    ], [{"name": "ties", "method": "ties", "topk": "row"},
        {"name": "sg", "method": "dare_ties", "score": "sparsegpt"},
        {"name": "regmean", "method": "regmean"}],
        calibration={"samples": 2, "seq_len": 16}, evaluation={"samples": 2, "seq_len": 16})
    result = cli("--json", "compare", str(recipe), code=None)
    assert result.exit_code == 0, result.stderr
    rows = {r["model"]: r for r in json.loads(result.stdout)}
    assert set(rows) == {"base", "full", "lora", "ties", "sg", "regmean"}
    # a tiny random model predicts about uniformly over its 96 tokens: perplexity near 96, never degenerate
    assert all(50 < r["ppl_mean"] < 200 for r in rows.values()), rows
    # the LoRA task vector is exactly what peft's merge adds
    merged_lora = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                            tmp_path / "lora").merge_and_unload().state_dict()
    base_sd = AutoModelForCausalLM.from_pretrained(tmp_path / "base").state_dict()
    ties = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "ties")
    changed = [k for k in base_sd if not torch.equal(merged_lora[k], base_sd[k])]
    assert changed and all(not torch.equal(ties.state_dict()[k], base_sd[k]) for k in changed)
    from mergecli.models.architectures import TESTED

    hessian_meta = json.loads(next((tmp_path / "ws" / "hessian").glob("*/hessian.json")).read_text())
    shared = next(a.shared_inputs for a in TESTED if a.model_type == model_type)
    sharing = len(hessian_meta["groups"]) < len(hessian_meta["members"])
    assert sharing == (shared != "-"), (model_type, hessian_meta["groups"])
    out = ties.generate(input_ids=torch.tensor([[1, 5, 9]]), max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)


def test_a_legacy_gpt2_base_without_the_model_prefix_merges_with_its_fine_tunes(tmp_path):
    """The hub's gpt2 stores `h.0.attn...` where GPT2LMHeadModel, and every fine-tune saved by
    transformers today, say `transformer.h.0.attn...`, and keeps old causal-mask buffers
    (`h.0.attn.bias`) a fine-tune does not have: the base and its fine-tunes still meet, through the
    statistics, the scored searches and the learned scales; the merge keeps the base's names and
    buffers, and transformers loads it."""
    from safetensors.torch import load_file, save_file

    from helpers import VERSE
    from mergecli.app.finetune import TrainSettings, train
    from mergecli.progress import SILENT

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("gpt2")).save_pretrained(tmp_path / "base")
    make_tokenizer(tmp_path / "base")
    weights = tmp_path / "base" / "model.safetensors"
    for name, texts in (("code", CODE), ("verse", VERSE)):  # fine-tuned from the prefixed base
        write_jsonl(tmp_path / f"{name}.jsonl", texts)
        train(tmp_path / "base", texts, tmp_path / name, TrainSettings(steps=6, lr=3e-3, seq_len=32), SILENT, name)
    masks = {f"h.{i}.attn.bias": torch.ones(1, 1, 32, 32).tril() for i in range(2)}  # old buffers, not weights
    save_file({**{k.removeprefix("transformer."): v for k, v in load_file(weights).items()}, **masks}, weights,
              metadata={"format": "pt"})
    assert not any(k.startswith("transformer.") for k in load_file(weights))
    recipe = write_recipe(tmp_path / "r.yaml", str(tmp_path / "base"), [
        {"name": n, "model": str(tmp_path / n), "dataset": {"path": f"./{n}.jsonl"}} for n in ("code", "verse")],
        [{"name": "ta", "method": "task_arithmetic", "lambda": 0.5}, {"name": "rm", "method": "regmean"},
         {"name": "learned", "method": "task_arithmetic", "lambda": "learned"}],
        calibration={"samples": 4, "seq_len": 32})
    results = {r["name"]: r for r in json.loads(cli("--json", "merge", str(recipe)).stdout)}
    groups = results["learned"]["search"]["scales"]  # under the model's names
    assert {"layer 0 mlp", "layer 1 attn", "transformer.wte.weight"} <= set(groups)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base").state_dict()
    fine = [AutoModelForCausalLM.from_pretrained(tmp_path / n).state_dict() for n in ("code", "verse")]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "ta").state_dict()
    for key, theta in base.items():
        if theta.is_floating_point() and key in fine[0]:
            assert torch.allclose(merged[key], theta + 0.5 * sum(f[key] - theta for f in fine), atol=1e-6), key
    written = load_file(tmp_path / "out" / "rm" / "model.safetensors")
    assert not any(k.startswith("transformer.") for k in written)
    assert all(torch.equal(written[k], v) for k, v in masks.items())  # copied from the base as they were
    rm = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "rm").state_dict()
    key = "transformer.h.0.attn.c_attn.weight"  # RegMean used the statistics: not the plain mean
    assert not torch.allclose(rm[key], (fine[0][key] + fine[1][key]) / 2, atol=1e-6)


def test_a_folder_whose_config_changed_is_described_anew(tmp_path):
    """The architecture is cached by config.json's bytes, never by the folder: a folder reused
    for another model (a rerun into the same path, a test's recycled temporary folder) gets its
    new architecture, not the one remembered for the path."""
    from mergecli.models.architecture import describe

    for model_type in ("gpt2", "llama", "gpt2"):
        tiny_config(model_type).save_pretrained(tmp_path)
        assert describe(tmp_path).model_type == model_type
