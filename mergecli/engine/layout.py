"""What each output tensor of a merge is made from: its layout.

A merge writes the base's tensors, each merged from the same tensor of every model (the whole
layout). A layer-stacking variant (`layers:`) writes a decoder stack of its own, block by block
(mergekit's output slices): output layer o is layer `first + j` of the block that holds it, copied
from one model (mergekit's passthrough) or merged by the block's method from the base's layer
`first + j` and each model's layer `its first + j`; its tensors are renamed to layer o. Tensors
outside the stack come from the first block if the model registers them before the stack (the
input embedding), else from the last (final norm, output layer), as mergekit's planner takes its
`pre_weights` and `post_weights`; a tied pair is one tensor, the input embedding.

Parameters are resolved as mergekit resolves them: shared ones for the output tensor's name,
each model's own (and its weight) for the name of the tensor it reads, at the position of the
layer in its block (i / (n - 1), 1 for a block of one layer, 0 outside the stack).

Names only: no tensor is read here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from ..methods.settings import Resolved, VariantSettings
from ..models.architecture import Architecture

BASE = -1
"""A copied block's source when it copies the base."""


@dataclass(frozen=True)
class Block:
    """One block of a layer-stacking variant: the layers [start, end) of its reference (the base
    for a merge, the copied model for a copy; None: every layer) and what makes them."""

    start: int | None = None
    end: int | None = None
    settings: VariantSettings | None = None  # a merge: the method, its parameters and the models' weights
    models: tuple[int, ...] = ()  # a merge: the models it merges (indexes of the plan's task vectors)
    starts: tuple[int | None, ...] = ()  # a merge: each model's first layer (None: the block's)
    source: int | None = None  # a copy: the model copied (a task vector's index, or BASE)
    scale: Any = None  # a copy: its `scale` setting (None: as stored)
    label: str = ""  # where the block is in the recipe, for messages ("layers.2")

    @property
    def copies(self) -> bool:
        return self.settings is None


@dataclass(frozen=True)
class Output:
    """One output tensor: written as `name`, made from the base's tensor `reference` (canonical;
    stored as `stored`) and, per model of its block, the tensor `inputs[i]` (canonical)."""

    name: str
    key: str  # tensors sharing a key are one (a tied pair)
    stored: str
    reference: str
    block: int
    inputs: tuple[str, ...]
    layer: int | None  # position in its block (None: outside the stack)
    length: int  # layers of its block (the base's depth for the whole layout)


@dataclass
class Layout:
    outputs: list[Output]
    blocks: list[Block]
    depth: int | None = None  # decoder layers written (None: the base's)
    origins: list[int] = field(default_factory=list)  # per output layer, the base layer it stands for

    def __post_init__(self) -> None:
        self.by_name = {o.name: o for o in self.outputs}

    def resolve(self, output: Output) -> Resolved:
        """The numbers `output` is merged with (a merge block's): shared parameters for its name
        (`key`: canonical, or a stacked layer's new name), each model's own and its weight for the
        tensor that model reads."""
        settings = self.blocks[output.block].settings
        assert settings is not None
        shared = settings.at(output.key, output.layer, output.length)
        if all(name == output.key for name in output.inputs):
            return shared
        own, weights = [], []
        per_model = {p.name for p in settings.method.params if p.per_model}
        for i, name in enumerate(output.inputs):
            at = settings.at(name, output.layer, output.length)
            own.append({**{k: v for k, v in at.params.items() if k in per_model}, **at.model_params[i]})
            weights.append(at.weights[i])
        return Resolved(shared.params, own, weights)

    def merged(self) -> Iterator[tuple[Block, Output]]:
        """Every output tensor a merge block makes, with its block."""
        for output in self.outputs:
            block = self.blocks[output.block]
            if not block.copies:
                yield block, output


def whole(arch: Architecture, names: Sequence[str], settings: VariantSettings, models: int) -> Layout:
    """The base's tensors, each merged from the same tensor of every model (`names`: the base's,
    as stored)."""
    block = Block(settings=settings, models=tuple(range(models)))
    outputs = []
    for name in names:
        canonical = arch.canonical(name)
        outputs.append(Output(name, canonical, name, canonical, 0, (canonical,) * models, arch.layer_of(canonical),
                              arch.num_layers))
    return Layout(outputs, [block])


def stacked(arch: Architecture, names: Sequence[str], blocks: Sequence[Block]) -> Layout:
    """A layer-stacking variant's tensors (`names`: the base's, as stored; every model has the
    base's tensors). ValueError naming the block whose range the base does not have."""
    depth = arch.num_layers
    if not depth:
        raise ValueError("layers: the base has no decoder stack mergecli can find")
    by_layer: dict[int, list[str]] = {}
    outside: list[str] = []
    for name in names:
        layer = arch.layer_of(arch.canonical(name))
        if layer is None or not 0 <= layer < depth:
            outside.append(name)
        else:
            by_layer.setdefault(layer, []).append(name)
    spans = []
    for index, block in enumerate(blocks):
        start, end = block.start or 0, depth if block.end is None else block.end
        where = block.label or f"layers.{index}"
        if end > depth:
            raise ValueError(f"{where}.range: [{start}, {end}] goes beyond the base's {depth} layers")
        for first, model in zip(block.starts, block.models):
            if first is not None and first + end - start > depth:
                raise ValueError(f"{where}.models: a range [{first}, {first + end - start}] goes beyond the "
                                 f"base's {depth} layers")
        spans.append((start, end))

    def output(name: str, block_index: int, layer: int | None, offset: int, length: int, out_name: str,
               key: str) -> Output:
        block = blocks[block_index]
        canonical = arch.canonical(name)
        if block.copies:
            inputs: tuple[str, ...] = ()
        elif layer is None:
            inputs = (canonical,) * len(block.models)
        else:
            start = spans[block_index][0]
            inputs = tuple(canonical if first is None or first == start
                           else arch.canonical(arch.renumbered(canonical, first + offset))
                           for first in (block.starts or (None,) * len(block.models)))
        return Output(out_name, key, name, canonical, block_index, inputs, layer, length)

    def outer(names_: list[str], block_index: int) -> list[Output]:
        length = spans[block_index][1] - spans[block_index][0]
        return [output(n, block_index, None, 0, length, n, arch.canonical(n)) for n in names_]

    before = [n for n in outside if arch.is_before_stack(arch.canonical(n))]
    after = [n for n in outside if not arch.is_before_stack(arch.canonical(n))]
    outputs = outer(before, 0)
    origins = []
    for index, (start, end) in enumerate(spans):
        for offset in range(end - start):
            reference = start + offset
            written = len(origins)
            origins.append(reference)
            for name in by_layer.get(reference, []):
                out_name = arch.renumbered(name, written)
                outputs.append(output(name, index, offset, offset, end - start, out_name, out_name))
    outputs += outer(after, len(blocks) - 1)
    return Layout(outputs, list(blocks), len(origins), origins)
