"""How a merge's scale is set: one interface, three ways (the recipe's `lambda`).

- fixed (a number, a gradient or a filter list): the recipe's values, nothing to choose;
- auto: one lambda for the whole merged change, chosen on held-out calibration windows (`search.py`);
- learned: one scale per layer module and fine-tune for an additive method's parts (`learn.py`).

Each way says what its choice depends on beyond the variant (its part of the merge's cache key,
from plain values the merge stage resolves), which merges of the fine-tunes it scores (`parts`:
none, the whole merge at lambda 1, or each fine-tune's part alone), how it chooses, and how the
model card tells the choice. The merge stage asks `chooser_for(merge)` once and never looks at the
mode again (`choosers.chooser_for`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Literal, Sequence

if TYPE_CHECKING:
    import torch

    from ..distributed import Group
    from ..engine.streamed import StreamedModel, Weights
    from ..models.architecture import Architecture
    from ..models.reference import ModelSource
    from ..progress import Reporter
    from ..recipe.schema import CalibrationSpec
    from .scoring import Domain


@dataclass(frozen=True)
class Setting:
    """Everything a choice reads, resolved once by the merge stage: the runner of the base's
    architecture, the base's weights, each merged fine-tune as a scoring domain, the text a learned
    merge is held to, and where the work runs."""

    merge: str  # the variant's name, for messages
    models: list[str]  # the merged fine-tunes, in the order of each part
    runner: "StreamedModel"
    base: "Weights"
    domains: list["Domain"]
    general: tuple[list[str], str] | None  # calibration.general's calibration part and its description
    base_source: "ModelSource"  # the base (its own text is sampled from it when there is no general text)
    tokenizer: Any
    calibration: "CalibrationSpec"
    device: "torch.device"
    group_of: Callable[[str], str | None]  # a module-tree weight -> its learned scales' group
    reporter: "Reporter"
    dist: "Group"


# How a chosen merge is written (in every chooser's key): from the parts its scale was scored on,
# base + the scaled parts (`engine.parts`), not merged again; a folder a re-merge wrote is not reused.
WRITTEN = "base + scaled parts"


@dataclass(frozen=True)
class Choice:
    """What the merge is built with: a lambda (None: the recipe's), a scale per group and fine-tune
    (None: none), and the record the card, the stamp and --json show."""

    lam: float | None = None
    scales: dict[str, list[float]] | None = None
    record: dict[str, Any] | None = None


class Chooser:
    """The fixed way: the recipe's lambda, nothing scored."""

    mode: ClassVar[str] = "fixed"
    parts: ClassVar[Literal["none", "whole", "each"]] = "none"

    def key(self, datasets: Callable[[], list[dict[str, Any]]], calibration: dict[str, Any],
            general: Callable[[], dict[str, Any] | None]) -> dict[str, Any] | None:
        """What the choice depends on beyond the variant (part of the merge's key): the merged
        fine-tunes' calibration text (`datasets()`: their fingerprints, computed when asked), the
        calibration settings, calibration.general's fingerprint (None if the recipe gives none)."""
        return None

    def choose(self, setting: Setting, parts: Sequence["Weights"]) -> Choice:
        return Choice()

    def log_line(self, record: dict[str, Any]) -> str:
        return ""

    def card_lines(self, record: dict[str, Any]) -> list[str]:
        return []


def part_scales(chooser: Chooser, models: int) -> list[list[float] | None]:
    """The scales of each merge `chooser` scores (`VariantPlan.scales` for every tensor): the whole
    merge (None), or each fine-tune's part alone (1 for it, 0 for the others)."""
    if chooser.parts == "whole":
        return [None]
    if chooser.parts == "each":
        return [[float(i == j) for j in range(models)] for i in range(models)]
    return []


def group_of(arch: "Architecture", name: str) -> str:
    """The scales' unit: a module of a decoder layer (its attention, its MLP, each norm: the name's
    part after the layer index), or a tensor outside the stack on its own (embedding, final norm,
    an untied lm_head)."""
    layer = arch.layer_of(name)
    if layer is None:
        return name
    return f"layer {layer} {name.split(f'.{layer}.', 1)[1].split('.')[0]}"


def group_order(group: str) -> tuple[int, int, str]:
    """Layers in depth order after the tensors outside the stack."""
    return (1, int(group.split()[1]), group) if group.startswith("layer ") else (0, 0, group)
