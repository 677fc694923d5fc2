"""The merged model's vocabulary and tokenizer, with mergekit 0.1.5's semantics (`tokenizer/build.py`,
`tokenizer/embed.py`, `merge.py`).

With `tokenizer.source` a merge has a vocabulary of its own: the base's (`base`: its tokenizer less
the tokens whose ids lie beyond its embedding rows), one model's (`<name>`: its tokenizer as it is),
or the union (`union`: the base's tokenizer, then each token another model has and the base lacks,
added in the order of the models, then their added tokens), plus the tokens `tokens` names.
Every vocabulary-indexed tensor of every input (input embedding, output layer) is re-mapped to it
by token before the merge: a model's own row where it has the token; where it lacks it, the row a
`tokens` entry gives, else the base's row if the base has the token, else the one model's that has
it, else the mean of those that have it, else zeros; rows beyond the tokens (`pad_to_multiple_of`)
are each model's mean row. The method then merges those rows like any tensor, so a token every
model has is merged as it would be without a tokenizer setting.

The tokenizer is built with transformers' own calls in mergekit's order, so the same transformers
version gives the same token ids; where several models add tokens the base lacks, their order is
the recipe's (mergekit's follows a Python set's order, which varies from run to run).

`chat_template` (mergekit's): a built-in template by name, `auto` (the most common template among
the base and the models), or a Jinja template, set on the tokenizer written with the model.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import tokenizers
import torch

from ..errors import MergeCliError
from ..models.quiet import quiet_libraries
from ..recipe.schema import BASE, ZERO, TokenizerSpec, TokenRow, chat_template_text


@dataclass(frozen=True)
class Input:
    """One model whose rows are re-mapped: its name (`base` for the base), the folder its tokenizer
    is read from (None: it has none of its own, the base's is taken, as mergekit does) and its
    embedding rows (config.json's `vocab_size`)."""

    key: str
    tokenizer: Path | None
    rows: int | None


@dataclass
class Vocabulary:
    """The merged vocabulary (token -> id) and, per input, the row each merged token has in it."""

    ids: dict[str, int]
    size: int  # rows of every vocabulary tensor written (the tokens, padded)
    rows: dict[str, torch.Tensor]  # per input: for each merged id, its row there (-1: it lacks the token)
    originals: dict[str, dict[str, int]]  # per input, its own vocabulary (a `{model, token}` rule reads it)
    spec: TokenizerSpec
    base: str = BASE

    @property
    def count(self) -> int:
        return len(self.ids)

    def remap(self, tensors: Mapping[str, torch.Tensor], tensor_name: str) -> dict[str, torch.Tensor]:
        """Each input's tensor (rows = its tokens) as `size` rows of the merged vocabulary, in fp32
        (mergekit's `PermutedVocabulary`; inputs in the order given, the base first when it is one)."""
        keys = list(tensors)
        views = {k: t.to(torch.float32) for k, t in tensors.items()}
        shape = next(iter(views.values())).shape[1:]
        count = self.count
        rows = {k: self.rows[k] for k in keys}
        present = torch.stack([rows[k] >= 0 for k in keys], dim=1)  # [tokens, inputs]
        forced = torch.zeros(count, dtype=torch.bool)
        default = torch.zeros((count, *shape), dtype=torch.float32)
        has_default = torch.zeros(count, dtype=torch.bool)
        configured = {self.ids[t]: rule for t, rule in self.spec.tokens.items() if t in self.ids}
        for token_id, rule in configured.items():
            forced[token_id] = rule.force
            if not rule.force and bool(present[token_id].all()):
                continue
            default[token_id] = self._configured(rule, token_id, views, rows, tensor_name)
            has_default[token_id] = True
        automatic = ~present.all(dim=1)
        if configured:
            automatic[list(configured)] = False
        held = present.sum(dim=1)
        single = automatic & (held == 1)
        if bool(single.any()):
            owner = present[single].to(torch.int64).argmax(dim=1)
            for index, key in enumerate(keys):
                take = single.clone()
                take[single] = owner == index
                default[take] = views[key][rows[key][take]]
            has_default |= single
        if self.base in keys:
            from_base = automatic & (held > 1) & present[:, keys.index(self.base)]
            default[from_base] = views[self.base][rows[self.base][from_base]]
            has_default |= from_base
        else:
            from_base = torch.zeros(count, dtype=torch.bool)
        mean = automatic & (held > 1) & ~from_base
        if bool(mean.any()):
            total = torch.zeros((int(mean.sum()), *shape), dtype=torch.float32)
            for key in keys:  # summed in the inputs' order, as mergekit's loop adds them
                holds = present[mean, keys.index(key)]
                total[holds] = total[holds] + views[key][rows[key][mean][holds]]
            default[mean] = total / held[mean].to(torch.float32).reshape(-1, *([1] * len(shape)))
            has_default |= mean
        has_default |= automatic & (held == 0)  # in no model: zeros (mergekit warns)
        out = {}
        for index, key in enumerate(keys):
            own = present[:, index] & ~forced
            tensor = torch.zeros((self.size, *shape), dtype=torch.float32)
            tensor[:count][own] = views[key][rows[key][own]]
            fill = ~own & has_default
            tensor[:count][fill] = default[fill]
            if self.size > count:  # padding: the mean of the token rows
                tensor[count:] = torch.mean(tensor[:count], dim=0)
            out[key] = tensor
        return out

    def _configured(self, rule: Any, token_id: int, views: Mapping[str, torch.Tensor],
                    rows: Mapping[str, torch.Tensor], tensor_name: str) -> torch.Tensor:
        """A `tokens` entry's row (mergekit's `compute_default_embedding`)."""
        source = rule.source
        if source == ZERO:
            return torch.zeros(next(iter(views.values())).shape[1:], dtype=torch.float32)
        model = source.model if isinstance(source, TokenRow) else source
        token = next(t for t, i in self.ids.items() if i == token_id)
        if model not in views:
            raise MergeCliError(f"tokenizer.tokens.{token}.source: {model} is not an input of tensor {tensor_name} "
                                f"(its inputs: {', '.join(views)})", "take the row from a model this tensor merges")
        if isinstance(source, TokenRow):
            row = source.token_id if source.token_id is not None else self.originals[model].get(source.token)
            if row is None:
                raise MergeCliError(f"tokenizer.tokens.{token}.source.token: {source.token!r} is not in {model}'s "
                                    "vocabulary")
            if not 0 <= row < views[model].shape[0]:
                raise MergeCliError(f"tokenizer.tokens.{token}.source.token_id: {row} is beyond {model}'s "
                                    f"{views[model].shape[0]} rows")
            return views[model][row]
        row = int(rows[model][token_id])
        if row < 0:
            raise MergeCliError(f"tokenizer.tokens.{token}.source: {model} has no token {token!r}",
                                "name a model that has it, or {model, token} for another token's row")
        return views[model][row]


@dataclass
class MergedTokenizer:
    """What a merge writes for its tokenizer: `tokenizer` (transformers') saved in place of the
    base's files, and the vocabulary its rows were re-mapped to (None: the base's rows)."""

    tokenizer: Any
    vocabulary: Vocabulary | None = None

    def save(self, folder: Path) -> None:
        """The tokenizer's files, and config.json's `vocab_size` when the rows were re-mapped."""
        self.tokenizer.save_pretrained(str(folder))
        if self.vocabulary is not None:
            config_path = folder / "config.json"
            config = json.loads(config_path.read_text())
            target = config["text_config"] if isinstance(config.get("text_config"), dict) else config
            target["vocab_size"] = self.vocabulary.size
            config_path.write_text(json.dumps(config, indent=2))


def merged_tokenizer(spec: TokenizerSpec, base: Input, models: Sequence[Input]) -> MergedTokenizer:
    """The tokenizer a merge writes (and, with `spec.source`, the vocabulary every input's rows are
    re-mapped to): `base`, then `models` in the recipe's order."""
    quiet_libraries()
    if spec.source is None:
        tokenizer = _load(base.tokenizer)
        vocabulary = None
    else:
        tokenizer, vocabulary = _build(spec, base, models)
    if spec.chat_template is not None:
        template = chat_template_text(spec.chat_template)
        if template is None:
            template = _most_common_template([base, *models])
        if template is not None:
            tokenizer.chat_template = template
    return MergedTokenizer(tokenizer, vocabulary)


def _load(folder: Path | None, use_fast: bool | None = None) -> Any:
    from transformers import AutoTokenizer

    kwargs = {} if use_fast is None else {"use_fast": use_fast}
    return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False, **kwargs)


def _build(spec: TokenizerSpec, base: Input, models: Sequence[Input]) -> tuple[Any, Vocabulary]:
    """mergekit's `build_tokenizer`: the output tokenizer and each input's rows for its tokens."""
    base_tokenizer = _stripped(base)
    tokenizers: dict[str, Any] = {base.key: base_tokenizer}
    for model in models:
        if model.tokenizer is not None:
            tokenizers[model.key] = _load(model.tokenizer)
    if spec.source == "base":
        out = base_tokenizer
    elif spec.source == "union":
        out = _union(base_tokenizer, {m.key: tokenizers[m.key] for m in [base, *models] if m.key in tokenizers},
                     {m.key: m.rows for m in [base, *models]})
    else:
        source = next(m for m in models if m.key == spec.source)
        out = _load(source.tokenizer or base.tokenizer)
    existing = set(out.get_vocab())
    for token in spec.tokens:
        if token not in existing:
            out.add_tokens(token)
            existing.add(token)
    ids = out.get_vocab()
    rows = {}
    for model in [base, *models]:
        own = tokenizers.get(model.key, tokenizers[base.key]).get_vocab()
        limit = model.rows if model.rows is not None else len(own)
        index = torch.full((len(ids),), -1, dtype=torch.int64)
        for token, new in ids.items():
            old = own.get(token)
            if old is not None and old < limit:
                index[new] = old
        rows[model.key] = index
    size = len(ids)
    if spec.pad_to_multiple_of and size % spec.pad_to_multiple_of:
        size = (size // spec.pad_to_multiple_of + 1) * spec.pad_to_multiple_of
    originals = {key: t.get_vocab() for key, t in tokenizers.items()}
    originals.update({m.key: originals[base.key] for m in models if m.key not in originals})
    return out, Vocabulary(ids, size, rows, originals, spec, base.key)


def _stripped(base: Input) -> Any:
    """mergekit's `get_stripped_tokenizer`: the base's tokenizer less the tokens whose ids lie at or
    beyond its embedding rows (a BPE tokenizer's; others must have none)."""
    tokenizer = _load(base.tokenizer, use_fast=True)
    size = base.rows or len(tokenizer.get_vocab())
    unused = [t for t, i in tokenizer.get_vocab().items() if i >= size]
    if not unused:
        return tokenizer
    if not tokenizer.is_fast:
        raise MergeCliError(f"{base.tokenizer}: the base's tokenizer has tokens beyond its {size} embedding rows and "
                            "no fast version to drop them from")
    data = json.loads(tokenizer._tokenizer.to_str())
    if data["model"]["type"] != "BPE":
        raise MergeCliError(f"{base.tokenizer}: the base's tokenizer ({data['model']['type']}) has tokens beyond its "
                            f"{size} embedding rows; mergekit and mergecli drop them from BPE tokenizers only")
    data["added_tokens"] = [e for e in data["added_tokens"] if e["id"] < size]
    for token in unused:
        data["model"]["vocab"].pop(token, None)

    def keep(merge: Any) -> bool:
        parts = merge.split(" ") if isinstance(merge, str) else merge
        return not any(part in unused for part in parts)

    data["model"]["merges"] = [m for m in data["model"]["merges"] if keep(m)]
    tokenizer._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(data))
    return tokenizer


def _union(base_tokenizer: Any, tokenizers: Mapping[str, Any], sizes: Mapping[str, int | None]) -> Any:
    """mergekit's `build_union_tokenizer`, call for call: the base's tokenizer (saved and read
    back, so the base's own is left as it is), then every token of the models' vocabularies it
    lacks, then their added tokens (the first model's settings for a token added twice)."""
    from transformers import AutoTokenizer

    out_added: dict[str, Any] = {}
    out_vocab: dict[str, int] = {}
    for key, tokenizer in tokenizers.items():
        size = sizes.get(key) or tokenizer.vocab_size
        added = tokenizer.added_tokens_decoder  # id -> AddedToken: mergekit tests a token string against it
        for token, index in tokenizer.get_vocab().items():
            if index >= size or token in added:
                continue
            out_vocab.setdefault(token, len(out_vocab))
        for index, info in added.items():
            if index < size:
                out_added.setdefault(info.content, info)
    with tempfile.TemporaryDirectory() as folder:
        base_tokenizer.save_pretrained(folder, legacy_format=False, safe_serialization=True)
        result = AutoTokenizer.from_pretrained(folder, use_fast=True, trust_remote_code=False)
    base_vocab = base_tokenizer.get_vocab()
    for token in out_vocab:
        if token not in out_added and token not in base_vocab:
            result.add_tokens(token)
    for info in out_added.values():
        result.add_tokens(info)
    return result


def _most_common_template(inputs: Sequence[Input]) -> str | None:
    """`chat_template: auto`: the template most of the inputs' tokenizers have (the first seen
    among equals)."""
    templates = []
    for model in inputs:
        if model.tokenizer is None:
            continue
        try:
            template = _load(model.tokenizer).chat_template
        except Exception:  # noqa: BLE001 - a tokenizer that does not load has no template to count (as mergekit)
            continue
        if isinstance(template, dict):
            template = template.get("default")
        if template:
            templates.append(template.strip())
    return Counter(templates).most_common(1)[0][0] if templates else None
