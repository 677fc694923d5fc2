"""Text the base model writes itself: what a learned merge is held to so that it does not forget.

Why: the scales of `lambda: learned` follow the fine-tunes' domains only, and nothing in that
objective says what the base knew; a recipe that gives no general text (`calibration.general`)
still needs something to hold them to (and evaluation text must stay unseen). The base's own
samples need no data: a model's mean NLL on them estimates the cross-entropy
H(p_base, p_model) = H(p_base) + KL(p_base || p_model), which rises as the model drifts from the
base's distribution. It is a proxy for the text a user cares about: on the quality benchmark's
testbed B it ranked six merges as the held-out general text (the Jargon File) did, but put the
learned merge 0.010 nats *below* RegMean where the Jargon File put it 0.012 above.

Sampling: from the base's start-of-text token (BOS, else EOS) at temperature 1 over the whole
vocabulary (no top-k/top-p, no repetition penalty: the model's own generation defaults are not
used), exactly `seq_len` tokens per window (end of text is suppressed), seeded (the global random
state is restored afterwards). `generate` fills every field its caller leaves unset from the model's
own generation_config.json (a checkpoint's `no_repeat_ngram_size`, `min_p`, `suppress_tokens`, ...
would reshape the distribution), so the model carries a blank one while it samples.
"""

from __future__ import annotations

import torch
from transformers import GenerationConfig

from ..engine.calibration import Windows
from ..errors import MergeCliError


def sample_windows(model: torch.nn.Module, count: int, seq_len: int, seed: int, batch_size: int,
                   device: torch.device) -> Windows:
    """`count` windows of `seq_len` tokens sampled from `model` (already on `device`)."""
    config = model.config
    start = next((t for t in (config.bos_token_id, config.eos_token_id) if t is not None), None)
    if isinstance(start, list):
        start = start[0]
    if start is None:
        raise MergeCliError("lambda: learned samples text from the base, and the base's config has no BOS or EOS "
                            "token to start it from", "set bos_token_id in the base's config.json")
    eos = config.eos_token_id
    settings = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=seq_len - 1,
                                min_new_tokens=seq_len - 1, bos_token_id=start, eos_token_id=eos,
                                pad_token_id=eos if eos is not None else start)
    rows, own = [], model.generation_config
    model.generation_config = GenerationConfig()
    try:
        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            with torch.no_grad():
                for begin in range(0, count, batch_size):
                    prompt = torch.full((min(batch_size, count - begin), 1), start, dtype=torch.long, device=device)
                    rows.append(model.generate(prompt, attention_mask=torch.ones_like(prompt),
                                               generation_config=settings).cpu())
    finally:
        model.generation_config = own
    ids = torch.cat(rows)
    return Windows(ids, torch.ones_like(ids))
