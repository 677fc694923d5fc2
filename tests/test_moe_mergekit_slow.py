"""`mergecli moe` against mergekit-moe 0.1.5 itself (`-m slow`: mergekit is installed into its own
virtual environment on first use, as `test_mergekit_slow.py` does; set MERGECLI_MERGEKIT_WORK to a
folder holding `mergekit-venv/` to reuse one).

Each config runs through `mergekit-moe` and `mergecli moe` on the same tiny models; both folders
are loaded by transformers and every tensor of the two models is compared (mergekit writes the
Mixtral experts fused, as transformers 5's module tree holds them, mergecli one tensor per expert
as transformers saves them: loading is what makes them comparable), and config.json too.
Everything but the routers must be equal bit for bit. Routers:
- random, uniform_random: the same draw, bit for bit (mergekit after --random-seed, mergecli --seed);
- cheap_embed: fp32 rounding;
- hidden, hidden_avg: mergekit runs the base in bfloat16, mergecli in fp32, so they differ by
  bfloat16 rounding; the transcription (`moe_oracle.reference_routers`) run in bfloat16 gives
  mergekit's routers, and run in fp32 mergecli's to fp32 rounding: the math is the same.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import cli
from moe_oracle import build_moe_models, moe_config, reference_routers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

CASES = {  # name: (gate_mode, shared expert, seed)
    "hidden": ("hidden", None, 0),
    "hidden_avg": ("hidden_avg", None, 0),
    "cheap_embed": ("cheap_embed", None, 0),
    "random": ("random", None, 3),
    "uniform_random": ("uniform_random", None, 4),
    "qwen_shared": ("hidden", "base", 0),  # mergekit reads no other shared expert
}


def _routers(state: dict[str, torch.Tensor]) -> list[str]:
    return sorted(n for n in state if n.endswith(("mlp.gate.weight", "shared_expert_gate.weight")))


def by_layer(gates: torch.Tensor, routers: list[str], experts: int) -> torch.Tensor:
    """(layers, gated, hidden) gate vectors as the rows of the named routers, concatenated."""
    rows = []
    for router in routers:
        layer = int(router.split(".")[2])
        rows.append(gates[layer, :experts] if router.endswith("mlp.gate.weight") else gates[layer, experts:])
    return torch.cat(rows)


@pytest.mark.slow
def test_mergekit_moe_and_mergecli_build_the_same_mixture(tmp_path_factory):
    import transformers
    from bench_merge import ensure_mergekit

    work = Path(os.environ.get("MERGECLI_MERGEKIT_WORK") or tmp_path_factory.mktemp("mergekit-moe"))
    try:
        exe = ensure_mergekit(work).parent / "mergekit-moe"
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"mergekit 0.1.5 cannot be installed here: {exc}")
    root = build_moe_models(tmp_path_factory.mktemp("moe-models"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    report = {}
    for name, (mode, shared, seed) in CASES.items():
        config = moe_config(root / f"{name}.yml", mode, shared=shared)
        theirs, ours = root / f"mergekit-{name}", root / f"mergecli-{name}"
        subprocess.run([str(exe), str(config), str(theirs), "--random-seed", str(seed)], cwd=root, env=env,
                       check=True, capture_output=True)
        cli("moe", config, "--output", ours, "--seed", seed)
        assert json.loads((ours / "config.json").read_text()) == json.loads((theirs / "config.json").read_text())
        cls = getattr(transformers, "Qwen2MoeForCausalLM" if shared else "MixtralForCausalLM")
        a = cls.from_pretrained(ours).state_dict()
        b = cls.from_pretrained(theirs).state_dict()
        assert set(a) == set(b), name
        routers = _routers(a)
        for tensor in sorted(set(a) - set(routers)):
            assert a[tensor].dtype == b[tensor].dtype and torch.equal(a[tensor], b[tensor]), f"{name}: {tensor}"
        data = yaml.safe_load(config.read_text())
        ours_rows = torch.cat([a[r] for r in routers])
        theirs_rows = torch.cat([b[r] for r in routers])
        entry = {"tensors": len(a), "routers": len(routers),
                 "router_max_abs_mergecli_vs_mergekit": float((ours_rows - theirs_rows).abs().max())}
        if mode.startswith("hidden"):
            experts = 2 if shared else 3
            bf16 = by_layer(reference_routers(data, root, torch.bfloat16), routers, experts)
            fp32 = by_layer(reference_routers(data, root, torch.float32), routers, experts)
            entry["router_max_abs_transcription_bf16_vs_mergekit"] = float((bf16.float() - theirs_rows).abs().max())
            entry["router_max_abs_transcription_fp32_vs_mergecli"] = float((fp32 - ours_rows).abs().max())
            assert entry["router_max_abs_transcription_bf16_vs_mergekit"] == 0.0, name
            assert entry["router_max_abs_transcription_fp32_vs_mergecli"] < 2e-6, name
            assert entry["router_max_abs_mergecli_vs_mergekit"] < 2e-2, name  # bfloat16 rounding of unit vectors
        elif mode == "cheap_embed":
            assert entry["router_max_abs_mergecli_vs_mergekit"] < 1e-6, name
        else:
            assert entry["router_max_abs_mergecli_vs_mergekit"] == 0.0, name
        model = cls.from_pretrained(ours).eval()
        ids = transformers.AutoTokenizer.from_pretrained(ours)("def add", return_tensors="pt")
        assert model.generate(**ids, max_new_tokens=4, do_sample=False).shape[1] == ids["input_ids"].shape[1] + 4
        report[name] = entry
    print(json.dumps(report, indent=1))
