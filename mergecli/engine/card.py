"""The model card of a merged model (or merged LoRA adapter): the Hub's metadata block and the recipe.

The Hugging Face Hub reads the YAML front matter: `base_model` (hub ids only: a local path there
is an invalid reference, so local models are named in the text instead), `base_model_relation:
merge` (the Hub's own relation for merges; `adapter` for a LoRA of one base), `tags` and
`library_name` (transformers for a model, peft for an adapter). mergekit writes the same block
(`card.generate_card`), with tags [mergekit, merge].
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import yaml

from ..models.reference import HUB_ID, is_local_reference


def hub_id(ref: str, root: Path | None = None) -> str | None:
    """`org/name` for a hub reference (`org/name@revision` too), None for a local path (one that
    exists under `root`, when given, or that starts like a path)."""
    if ref.startswith((".", "/", "~")) or not HUB_ID.match(ref) or (root and is_local_reference(ref, root)):
        return None
    return ref.split("@", 1)[0]


def card_metadata(base: str, models: list[str], adapter: bool = False, root: Path | None = None) -> dict:
    """The front matter: hub ids of the base and the merged models (for an adapter: the base it
    applies to), the relation, tags and library."""
    refs = [base] if adapter else [base, *models]
    ids = list(dict.fromkeys(i for i in (hub_id(r, root) for r in refs) if i))
    meta: dict = {}
    if ids:
        meta["base_model"] = ids
        meta["base_model_relation"] = "adapter" if adapter else "merge"
    meta["tags"] = ["merge", "mergecli"] + (["lora"] if adapter else [])
    meta["library_name"] = "peft" if adapter else "transformers"
    return meta


def setting_text(value: Any) -> str:
    """A parameter or weight as the card shows it: a number, or its gradient / filter list inline."""
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, dict)):
        return yaml.safe_dump(value, default_flow_style=True, sort_keys=False).strip()
    return str(value)


def model_card(title: str, base: str, models: Sequence[tuple[str, str, str]], recipe_yaml: str, summary: str = "",
               adapter: bool = False, root: Path | None = None) -> str:
    """README.md text: front matter, what was merged (name, source and weight of each model), the
    summary lines the merge stage adds (method, kept density, timing...), and the recipe."""
    meta = yaml.safe_dump(card_metadata(base, [ref for _, ref, _ in models], adapter, root), sort_keys=False).strip()
    rows = "\n".join(f"| {name} | `{ref}` | {weight} |" for name, ref, weight in models)
    kind = "a LoRA adapter for the base model" if adapter else "a merge"
    return f"""---
{meta}
---
# {title}

This is {kind} made with [mergecli](https://pypi.org/project/mergecli/).

Base model: `{base}`

| merged model | source | weight |
|---|---|---|
{rows}

{summary}

## Recipe

```yaml
{recipe_yaml.strip()}
```
"""


def account_lines(account: dict[str, Any], names: bool = True, shown: int = 4) -> list[str]:
    """What happened to every tensor, in words: merged, copied from the base (and why), fine-tunes'
    buffers not written or lacked (`writer.account_of`)."""
    def listed(items: list[str]) -> str:
        more = f", +{len(items) - shown} more" if len(items) > shown else ""
        return f" ({', '.join(items[:shown])}{more})" if names else ""

    lines = [f"{account.get('merged', 0)} merged"]
    lines += [f"{len(items)} copied from the base: {why}{listed(items)}"
              for why, items in account.get("copied", {}).items()]
    lines += [f"{len(items)} copied as stored from {model} (layer stacking){listed(items)}"
              for model, items in account.get("passed_through", {}).items()]
    lines += [f"{len(items)} buffers of {model} skipped (not weights; the base has none){listed(items)}"
              for model, items in account.get("skipped_buffers", {}).items()]
    lines += [f"{model} lacks {len(items)} buffers of the base (copied from the base){listed(items)}"
              for model, items in account.get("lacking_buffers", {}).items()]
    return lines
