"""Dataset specs -> seeded, reproducible token windows with attention masks.

Texts come from `datasets.load_dataset` (a local json/jsonl/csv/parquet/txt file or folder, a
loader name with data_files, or a hub dataset). Chat data (a column of `messages` lists) is
rendered with the tokenizer's chat template. Documents are shuffled with the seed, then either
packed into full windows of `seq_len` tokens (EOS between documents) or, with `pack: false`,
truncated/padded one per window with the padding masked out; or spread, one window per document
(`spread_windows`: what `draw_windows` gives the hessian stage and a merge's scale search with
`pack: true`; packing whole documents stays for fine-tuning and evaluation). A dataset that
cannot be loaded, lacks the field, or is too small is an error naming the spec, never a silent
fallback.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..recipe.datasets import dataset_source, describe_spec
from ..errors import MergeCliError
from ..recipe.schema import CalibrationSpec, DatasetSpec


@dataclass(frozen=True)
class Windows:
    input_ids: torch.Tensor  # (samples, seq_len) int64
    attention_mask: torch.Tensor  # (samples, seq_len) int64, 0 on padding
    # the document each window starts in (its index in the text's order), where the windows were cut
    # from documents: windows of one document are not independent samples of the text (`gain.py`)
    documents: tuple[int, ...] | None = None

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())

    def batches(self, size: int):
        for start in range(0, self.input_ids.shape[0], size):
            yield self.input_ids[start:start + size], self.attention_mask[start:start + size]


def load_texts(spec: DatasetSpec, root: Path, tokenizer, part: str = "calibration") -> list[str]:
    """The documents of a dataset spec as strings: its calibration part or its held-out eval part.

    With `eval_split` the two are separate splits; otherwise the last `holdout` fraction of the
    documents of `split` (in file order) is for evaluation only, so perplexity is never measured
    on text a Hessian was collected from.
    """
    texts = _load_all(spec, root, tokenizer, spec.eval_split if part == "eval" and spec.eval_split else spec.split)
    if spec.eval_split:
        return texts
    cut = len(texts) - max(1, round(len(texts) * spec.holdout))
    return texts[cut:] if part == "eval" else texts[:cut]


def _load_all(spec: DatasetSpec, root: Path, tokenizer, split: str) -> list[str]:
    import datasets

    datasets.disable_progress_bars()
    source = dataset_source(spec, root)
    empty = next((f for f in source.files if f.stat().st_size == 0), None)
    if empty is not None and len(source.files) == 1:
        raise MergeCliError(f"dataset {describe_spec(spec)}: {empty} is empty")
    kwargs: dict = {"split": split}
    if source.pass_files:
        kwargs["data_files"] = [str(f) for f in source.files]
    try:
        data = datasets.load_dataset(source.path, spec.name, **kwargs)
    except Exception as exc:  # noqa: BLE001 - datasets raises many kinds; all mean "cannot load"
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MergeCliError(f"cannot load dataset {describe_spec(spec)}: {reason}",
                            "check path, name, split and data_files (hub datasets need network access)") from None
    field = spec.messages_field or spec.text_field
    if field not in data.column_names:
        raise MergeCliError(f"dataset {describe_spec(spec)} has no column {field!r} "
                            f"(columns: {', '.join(data.column_names)})",
                            "set dataset.text_field (or messages_field for chat data)")
    if spec.messages_field:
        if not getattr(tokenizer, "chat_template", None):
            raise MergeCliError(f"dataset {describe_spec(spec)}: chat messages need a tokenizer with a chat template")
        return [tokenizer.apply_chat_template(m, tokenize=False) for m in data[field]]
    texts = [t for t in data[field] if isinstance(t, str) and t.strip()]
    if not texts:
        raise MergeCliError(f"dataset {describe_spec(spec)} has no non-empty text in column {field!r}")
    return texts


def make_windows(texts: list[str], tokenizer, samples: int, seq_len: int, seed: int, pack: bool = True,
                 what: str = "dataset") -> Windows:
    """`samples` windows of `seq_len` tokens, identical for identical inputs."""
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    ids = torch.full((samples, seq_len), pad, dtype=torch.long)
    mask = torch.zeros((samples, seq_len), dtype=torch.long)
    if pack:
        stream: list[int] = []
        starts: list[tuple[int, int]] = []  # (position in the stream, document) where each document begins
        need = samples * seq_len
        for i in order:
            starts.append((len(stream), i))
            stream.extend(tokenizer(texts[i], add_special_tokens=False)["input_ids"])
            if eos is not None:
                stream.append(eos)
            if len(stream) >= need:
                break
        if len(stream) < need:
            raise MergeCliError(f"{what} has {len(stream)} tokens, {samples} windows of {seq_len} need {need}",
                                "lower --samples or --seq-len, or add text")
        ids[:] = torch.tensor(stream[:need]).reshape(samples, seq_len)
        mask[:] = 1
        documents, k = [], 0
        for row in range(samples):
            while k + 1 < len(starts) and starts[k + 1][0] <= row * seq_len:
                k += 1
            documents.append(starts[k][1])
        return Windows(ids, mask, tuple(documents))
    if len(order) < samples:
        raise MergeCliError(f"{what} has {len(order)} documents, --samples {samples} needs as many",
                            "lower --samples, or use pack: true")
    for row, i in enumerate(order[:samples]):
        tokens = tokenizer(texts[i], add_special_tokens=False)["input_ids"][:seq_len]
        ids[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        mask[row, :len(tokens)] = 1
    return Windows(ids, mask, tuple(order[:samples]))


def spread_windows(texts: list[str], tokenizer, samples: int, seq_len: int, seed: int,
                   what: str = "dataset") -> Windows:
    """`samples` full windows of `seq_len` tokens from as many documents as the text has: a
    document of at least `seq_len` tokens gives one window, a slice at a seeded random offset;
    shorter ones are packed together as `make_windows` packs them (EOS after each). Only when every
    document has given its share does one give another (a new random slice).

    Why: packing takes whole documents in turn, so 32 windows of a corpus of long files (code,
    headers, plays, manuals) come from a handful of files, and a merge fitted or judged on them is
    fitted to those files (on the quality benchmark's testbed B, plain RegMean kept 3.6 points more
    of the gain on such windows than on held-out documents); spread out, the same number of tokens
    samples the corpus."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(texts), generator=generator).tolist()
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]

    def rounds():
        """Every document's tokens in the shuffled order, then again and again (tokenized once)."""
        seen: list[list[int]] = []
        for i in order:
            seen.append(tokenizer(texts[i], add_special_tokens=False)["input_ids"])
            yield seen[-1]
        total = sum(len(tokens) + len(eos) for tokens in seen if tokens)
        if total < samples * seq_len:
            raise MergeCliError(f"{what} has {total} tokens, {samples} windows of {seq_len} need "
                                f"{samples * seq_len}", "lower --samples or --seq-len, or add text")
        while True:
            yield from seen

    rows: list[list[int]] = []
    short: list[int] = []
    for tokens in rounds():
        if len(tokens) >= seq_len:
            start = int(torch.randint(len(tokens) - seq_len + 1, (1,), generator=generator))
            rows.append(tokens[start:start + seq_len])
        elif tokens:
            short += tokens + eos
            while len(short) >= seq_len:
                rows.append(short[:seq_len])
                short = short[seq_len:]
        if len(rows) >= samples:
            break
    ids = torch.tensor(rows[:samples], dtype=torch.long)
    return Windows(ids, torch.ones_like(ids))


DRAW = "one per document"  # how `draw_windows` draws, in the keys of what is computed from its windows


def draw_windows(texts: list[str], tokenizer, samples: int, cal: CalibrationSpec, seed: int,
                 what: str = "dataset") -> Windows:
    """The calibration windows of a fine-tune, as every data-aware step draws them: with
    `pack: true` spread one per document (`spread_windows`), else one padded window per document.

    Why spread for the statistics too: H = X^T X of 32 packed windows of a corpus of long files
    describes a handful of files; spread over the corpus, the same tokens gave RegMean +1.95 ± 0.27
    points of the gain on the quality benchmark's testbed B and +0.32 ± 0.18 on C, and less
    forgetting on both (benchmarks/quality-results.md)."""
    if cal.pack:
        return spread_windows(texts, tokenizer, samples, cal.seq_len, seed, what=what)
    return make_windows(texts, tokenizer, samples, cal.seq_len, seed, pack=False, what=what)
