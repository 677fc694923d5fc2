"""Every supported architecture end to end: full fine-tune + LoRA -> taskvec -> hessian -> merge ->
eval -> from_pretrained + generate, on tiny configs built locally."""

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from helpers import make_tokenizer, write_recipe
from mergecli.cli import app
from helpers import TINY_CONFIGS, tiny_config

runner = CliRunner()
TEXT = [f"def f{i}(x):\n    return x * {i} + {i + 1}\n" for i in range(80)]


def lora_targets(model) -> list[str]:
    """Every linear-ish leaf module name suffix inside the decoder blocks (for LoRA)."""
    from transformers.pytorch_utils import Conv1D

    names = {n.split(".")[-1] for n, m in model.named_modules()
             if isinstance(m, (torch.nn.Linear, Conv1D)) and m is not model.get_output_embeddings()}
    return sorted(names)


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
    (tmp_path / "code.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in TEXT))
    recipe = write_recipe(tmp_path / "r.yaml", str(tmp_path / "base"), [
        {"name": "full", "model": "./full", "dataset": {"path": "./code.jsonl"}},
        {"name": "lora", "model": "./lora", "dataset": {"path": "./code.jsonl"}, "check_base": False},
    ], [{"name": "ties", "method": "ties", "topk": "row"},
        {"name": "sg", "method": "dare_ties", "score": "sparsegpt"},
        {"name": "regmean", "method": "regmean"}],
        calibration={"samples": 2, "seq_len": 16}, evaluation={"samples": 2, "seq_len": 16})
    result = runner.invoke(app, ["--json", "compare", str(recipe)])
    assert result.exit_code == 0, result.stderr
    rows = {r["model"]: r for r in json.loads(result.stdout)}
    assert set(rows) == {"base", "full", "lora", "ties", "sg", "regmean"}
    assert all(r["ppl_mean"] > 1 for r in rows.values())
    # the LoRA task vector is exactly what peft's merge adds
    merged_lora = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                            tmp_path / "lora").merge_and_unload().state_dict()
    base_sd = AutoModelForCausalLM.from_pretrained(tmp_path / "base").state_dict()
    ties = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "ties")
    changed = [k for k in base_sd if not torch.equal(merged_lora[k], base_sd[k])]
    assert changed and all(not torch.equal(ties.state_dict()[k], base_sd[k]) for k in changed)
    hessian_meta = json.loads(next((tmp_path / "ws" / "hessian").glob("*/hessian.json")).read_text())
    assert len(hessian_meta["groups"]) < len(hessian_meta["members"]) or model_type in ("bloom", "gpt2", "phi3", "gpt_neox")
    out = ties.generate(input_ids=torch.tensor([[1, 5, 9]]), max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)
