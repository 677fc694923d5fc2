"""A merge written as a LoRA adapter: per module, the merged delta truncated by SVD.

By Eckart-Young the best rank-r approximation of a module's merged delta dW (in Frobenius norm) is
its SVD truncated to the r largest singular values; the error is sqrt(sum of the dropped sigma^2),
and `energy_kept` = sum of the kept sigma^2 / sum of all: the fraction of ||dW||^2 the adapter
holds. The factors split sqrt(S) between them (B = U_r sqrt(S_r), A = sqrt(S_r) V_r^T), so neither
is much larger than the other (fp16/bf16 adapters, further training), and lora_alpha = r makes
peft's scaling exactly 1.

The merge stage streams: `write_merged_adapter` takes each merged tensor as the merge engine
computes it (`merging.merged_tensors`), keeps only its factors (or, for the few tensors saved
whole, the tensor), and writes the folder at the end.

What goes where, in peft's own format (`adapter_config.json`, `adapter_model.safetensors`), so
`PeftModel.from_pretrained(base, folder)` loads it and `merge_and_unload()` gives the merged model:

- weights of nn.Linear / Conv1D layers: `lora_A` (r x in), `lora_B` (out x r); Conv1D (GPT-2)
  stores in x out, so its delta is transposed first and the config sets `fan_in_fan_out`;
- embeddings: `lora_embedding_A` (r x vocab), `lora_embedding_B` (dim x r), the factors of dW^T
  (peft's embedding layout); a tied output layer follows its embedding;
- anything else that changed (norms, biases of layers without a LoRA, position tables): saved
  whole in `modules_to_save`, exact; a changed bias of a LoRA-targeted layer is saved whole under
  its `base_layer`;
- tensors whose delta is exactly zero: nothing.

Per-module ranks below r (a small matrix, or a delta of lower rank than r) go in `rank_pattern`
and `alpha_pattern` (regex-escaped full module names, as peft matches them), keeping scaling 1.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
import time
from typing import Callable, Iterable, Mapping

import torch

from ..models.architecture import Architecture
from ..models.safetensors_io import Checkpoint
from ..progress import Reporter
from .writer import Tally, VariantPlan, Written, output_infos, stream

PREFIX = "base_model.model."
KINDS = ("linear", "conv1d", "embedding")


@dataclass(frozen=True)
class Factors:
    """dW ~= B @ A with A (r x in) and B (out x r); the truncation's error and energy."""

    A: torch.Tensor
    B: torch.Tensor
    energy_kept: float  # sum of kept sigma^2 / sum of all sigma^2 (1 for a zero delta)
    error: float  # Frobenius norm of dW - B @ A: sqrt(sum of dropped sigma^2)
    norm: float  # Frobenius norm of dW

    @property
    def rank(self) -> int:
        return self.A.shape[0]


def _from_svd(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int) -> Factors:
    r = max(1, min(rank, s.numel()))
    energy = s.double().square()
    total = float(energy.sum())
    kept = float(energy[:r].sum())
    root = s[:r].sqrt()
    return Factors(A=root[:, None] * vh[:r], B=u[:, :r] * root, energy_kept=kept / total if total > 0 else 1.0,
                   error=max(total - kept, 0.0) ** 0.5 if total > 0 else 0.0, norm=total ** 0.5)


def truncate(delta: torch.Tensor, rank: int) -> Factors:
    """The best rank-`rank` factors of `delta` (out x in, fp32 math)."""
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    return _from_svd(u, s, vh, rank)


@dataclass(frozen=True)
class ModuleReport:
    """What the adapter holds for one module."""

    kind: str  # "lora" | "embedding" | "full"
    rank: int
    energy_kept: float
    error: float
    norm: float


def module_kinds(model: torch.nn.Module) -> dict[str, str]:
    """Weight name -> "linear" | "conv1d" | "embedding" for every layer a LoRA can target
    (the model may live on the meta device)."""
    from transformers.pytorch_utils import Conv1D

    kinds = {}
    for name, module in model.named_modules():
        if isinstance(module, Conv1D):
            kinds[f"{name}.weight"] = "conv1d"
        elif isinstance(module, torch.nn.Linear):
            kinds[f"{name}.weight"] = "linear"
        elif isinstance(module, torch.nn.Embedding):
            kinds[f"{name}.weight"] = "embedding"
    return kinds


def plan_adapter(deltas: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], kinds: Mapping[str, str],
                 rank: int, base: Callable[[str], torch.Tensor]
                 ) -> tuple[dict[str, torch.Tensor], dict[str, ModuleReport], dict]:
    """The adapter's tensors (peft keys), a report per module, and the LoraConfig arguments.

    `deltas`: merged delta per weight name, in the checkpoint's layout (a mapping, or pairs read
    one at a time: only factors and the tensors saved whole are kept); `kinds`: see
    `module_kinds`; `base(name)`: the base tensor (for what is saved whole).
    """
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    state: dict[str, torch.Tensor] = {}
    report: dict[str, ModuleReport] = {}
    targets: dict[str, int] = {}
    whole: dict[str, torch.Tensor] = {}
    for name, delta in deltas.items() if isinstance(deltas, Mapping) else deltas:
        if not bool(delta.ne(0).any()):
            continue
        module, _, param = name.rpartition(".")
        kind = kinds.get(name) if param == "weight" else None
        if kind not in KINDS:
            whole[name] = (base(name).float() + delta.float()).contiguous()
            report[name] = ModuleReport("full", 0, 1.0, 0.0, float(delta.float().norm()))
            continue
        f = truncate(delta if kind == "linear" else delta.T, rank)  # peft: embedding and Conv1D are (B A)^T
        a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if kind == "embedding" else \
            ("lora_A.weight", "lora_B.weight")
        state[f"{PREFIX}{module}.{a_key}"] = f.A.contiguous()
        state[f"{PREFIX}{module}.{b_key}"] = f.B.contiguous()
        targets[module] = f.rank
        report[module] = ModuleReport("embedding" if kind == "embedding" else "lora", f.rank, f.energy_kept,
                                      f.error, f.norm)
    saved_whole: set[str] = set()
    for name, full in whole.items():  # a changed bias of a LoRA-targeted layer goes under its base_layer
        module, _, param = name.rpartition(".")
        if module in targets:
            state[f"{PREFIX}{module}.base_layer.{param}"] = full
        else:
            state[f"{PREFIX}{name}"] = full
            saved_whole.add(module)
    if not targets and not saved_whole:
        raise ValueError("every delta is zero: there is nothing to write as an adapter")
    patterns = {re.escape(m): r for m, r in sorted(targets.items()) if r != rank}
    config = {
        "r": rank, "lora_alpha": rank, "target_modules": sorted(targets), "rank_pattern": patterns,
        "alpha_pattern": dict(patterns), "modules_to_save": sorted(saved_whole) or None,
        "fan_in_fan_out": any(kinds.get(f"{m}.weight") == "conv1d" for m in targets),
        "task_type": "CAUSAL_LM", "bias": "none",
    }
    return state, dict(sorted(report.items())), config


def write_adapter(folder: Path, deltas: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                  kinds: Mapping[str, str], rank: int, base_model: str, base: Callable[[str], torch.Tensor],
                  dtype: torch.dtype = torch.float32) -> dict[str, ModuleReport]:
    """Write a peft LoRA folder for `base_model` into `folder`; return the per-module report (also
    saved as `mergecli_lora.json`). See `plan_adapter` for the arguments."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    state, report, config = plan_adapter(deltas, kinds, rank, base)
    folder.mkdir(parents=True, exist_ok=True)
    LoraConfig(base_model_name_or_path=base_model, **config).save_pretrained(str(folder))
    saved = json.loads((folder / "adapter_config.json").read_text())  # peft keeps target_modules as a set:
    saved["target_modules"] = sorted(saved["target_modules"])  # sorted, the file is the same on every run
    (folder / "adapter_config.json").write_text(json.dumps(saved, indent=2, sort_keys=True))
    save_file({k: v.to(dtype).contiguous() for k, v in state.items()}, str(folder / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    (folder / "mergecli_lora.json").write_text(json.dumps(
        {"rank": rank, "modules": {m: asdict(r) for m, r in report.items()}}, indent=1))
    return report


def base_kinds(base: Path) -> dict[str, str]:
    """`module_kinds` of the base model, built on the meta device from its config (no weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base, trust_remote_code=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    return module_kinds(model)


def write_merged_adapter(folder: Path, plan: VariantPlan, base: Path, base_model: str, arch: Architecture,
                         device: torch.device, workers: int, reporter: Reporter, label: str, rank: int,
                         dtype: torch.dtype) -> tuple[Written, dict[str, ModuleReport]]:
    """A merge variant written as an adapter of `base_model` (the base at `base`): each tensor is
    merged in fp32 by the merge engine (`plan.dtype` must be float32), its change from the base
    factored as it comes, the factors written in `dtype`."""
    start = time.perf_counter()
    kinds = base_kinds(base)
    tally = Tally()
    with Checkpoint.open(base) as ckpt:
        infos = output_infos(plan, ckpt, arch, {})
        with reporter.track(label, len(infos)) as advance:
            def deltas() -> Iterable[tuple[str, torch.Tensor]]:
                for info, tensor, first in stream(plan, ckpt, infos, arch, device, workers, label, tally):
                    advance(1)
                    if first and tensor.dtype.is_floating_point:  # a tied alias follows its canonical tensor
                        yield info.name, tensor - ckpt.get(info.name).float()
            report = write_adapter(folder, deltas(), kinds, rank, base_model, ckpt.get, dtype)
    files = sorted(p.name for p in folder.iterdir() if p.is_file())
    return tally.written(time.perf_counter() - start, len(infos), files, plan.vectors), report
