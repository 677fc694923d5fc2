"""A merged folder keeps the base's file names, so transformers 4 loads it too (`-m slow`: transformers
4.57 is installed from PyPI into its own virtual environment, beside this one's packages).

transformers 5 renames and fuses checkpoint keys on load (GPT-NeoX's `embed_out`, MoE experts stored
one tensor each); a merge written under the module tree's names would load in 5 only. The same
merged folders must give the same logits in both.
"""

import json
import subprocess
import venv

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import cli, write_recipe
from test_every_tensor import save_base_and_fine_tune

IDS = [[1, 5, 9, 12, 7, 4, 8, 10]]
LOGITS = """
import json, sys, torch, transformers
from transformers import AutoModelForCausalLM
assert transformers.__version__.startswith("4."), transformers.__version__
out = {}
for folder in sys.argv[1:]:
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        out[folder] = model(torch.tensor(%s)).logits.tolist()
print(json.dumps(out))
""" % IDS


def transformers4(work) -> str:
    """A venv with transformers 4 over this interpreter's packages (torch, safetensors...)."""
    env = work / "tf4"
    if not (env / "bin" / "python").exists():
        venv.create(env, system_site_packages=True, with_pip=True)
        try:
            subprocess.run([env / "bin" / "python", "-m", "pip", "install", "--quiet", "transformers>=4.50,<5"],
                           check=True, capture_output=True)
        except subprocess.CalledProcessError as exc:
            pytest.skip(f"transformers 4 cannot be installed here: {exc.stderr[-300:]}")
    return str(env / "bin" / "python")


@pytest.mark.slow
def test_merged_folders_load_in_transformers_4_with_the_same_logits(tmp_path_factory):
    work = tmp_path_factory.mktemp("tf4")
    folders = []
    for model_type in ("llama", "gpt_neox", "mixtral", "qwen2_moe", "gpt2"):
        root = work / model_type
        save_base_and_fine_tune(root, model_type)
        recipe = write_recipe(root / "r.yaml", str(root / "base"), [{"name": "full", "model": "./full"}],
                              [{"name": "ta", "method": "task_arithmetic", "lambda": 0.5}])
        cli("merge", recipe)
        folders.append(root / "out" / "ta")
    run = subprocess.run([transformers4(work), "-c", LOGITS, *map(str, folders)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    old = json.loads(run.stdout.splitlines()[-1])
    for folder in folders:
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        with torch.no_grad():
            new = model(torch.tensor(IDS)).logits
        torch.testing.assert_close(torch.tensor(old[str(folder)]), new, rtol=1e-4, atol=1e-4, msg=str(folder))
