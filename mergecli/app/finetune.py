"""A small causal-LM fine-tuner (full or LoRA) used by `mergecli demo` to make its own fine-tunes.

Plain AdamW on packed, seeded windows of a text corpus; LoRA through peft. Deliberately short
runs with a high learning rate: the demo needs each fine-tune to move clearly towards its domain
in about a minute of CPU time, not a production training loop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..engine.calibration import make_windows
from ..progress import Reporter


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # every linear layer


@dataclass(frozen=True)
class TrainSettings:
    steps: int
    lr: float
    batch_size: int = 4
    seq_len: int = 128
    seed: int = 0
    lora_rank: int | None = None  # None: full fine-tune

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def train(base: Path, texts: list[str], out: Path, settings: TrainSettings, reporter: Reporter, label: str
          ) -> list[float]:
    """Fine-tune `base` on `texts` and save a full model or a LoRA adapter to `out`; returns the losses.

    Training runs in fp32; a full fine-tune is saved in the dtype its base is stored in (as real
    fine-tunes are: a bf16 model's fine-tunes are bf16), a LoRA adapter in fp32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(settings.seed)
    tokenizer = AutoTokenizer.from_pretrained(base, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto", trust_remote_code=False)
    stored = model.dtype
    model = model.float()
    if settings.lora_rank:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=settings.lora_rank, lora_alpha=2 * settings.lora_rank, lora_dropout=0.0,
                            target_modules=list(LORA_TARGETS), base_model_name_or_path=str(base))
        model = get_peft_model(model, config)
    model.train()
    windows = make_windows(texts, tokenizer, settings.steps * settings.batch_size, settings.seq_len,
                           settings.seed, what=f"training text of {label}")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings.lr,
                                  weight_decay=0.0)
    losses = []
    start = time.perf_counter()
    with reporter.track(f"fine-tune {label}", settings.steps) as advance:
        for step, (ids, _) in enumerate(windows.batches(settings.batch_size)):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            advance(1)
            if step == 0 or (step + 1) % 5 == 0 or step + 1 == settings.steps:
                reporter.log(f"  {label} step {step + 1}/{settings.steps}: loss {losses[-1]:.3f} "
                             f"({time.perf_counter() - start:.0f} s)")
    model.eval()
    if not settings.lora_rank:
        model.to(stored)
        tokenizer.save_pretrained(out)
    model.save_pretrained(out)
    return losses
