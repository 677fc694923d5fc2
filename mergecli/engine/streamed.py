"""Run a causal LM one decoder block at a time, its weights supplied block by block by a callback.

Why: everything that runs a model loaded it whole (`models.loading.load_causal_lm`, fp32), and
Llama-2-7B is 28 GB in fp32 (DESIGN §14). A causal LM is embeddings -> a stack of decoder blocks
-> final norm and output layer, and only the hidden state (tokens x hidden) crosses a block
boundary. So the runner holds the modules outside the stack, one block's weights at a time and the
hidden states at block boundaries; a caller's `weights(names) -> {module name: tensor}` gives the
tensors when they are needed (read lazily from safetensors, `checkpoint_weights`, or assembled,
e.g. theta(s) = base + sum_i s_i part_i), which is also how one runner evaluates base, fine-tunes
and merges: the weights are an argument of each run, not of the runner.

The pieces, and why each is there:
- The skeleton is the model class transformers builds from the config on the meta device (no
  memory; never remote code), so every architecture runs its own code: no per-family forward.
- Block arguments are captured, not assumed: the model's own forward runs with every block's
  `forward` replaced by a stub (an instance attribute: the block object, its attributes such as
  `attention_type`, and its hooks stay in place) that records that block's own (args, kwargs) --
  causal or sliding-window mask by the layer's attention type, rotary tables, ALiBi, position ids
  -- and passes the hidden state on. Layer 0's arguments are never reused for another layer.
- The part after the stack (final norm, output layer, and whatever else the class does there:
  GPT-2's reshape, logit scaling or soft-capping) is the model's own forward again, with the stubs
  and the last one returning the given final hidden state, in the structure the real blocks return
  (BLOOM's are tuples, the model takes `[0]`). The embedding it recomputes is discarded.
- A block is materialized by putting tensors in its parameter slots and back to the meta
  originals afterwards; a tied pair (embedding / output layer) is one Parameter in both slots, so
  its gradient is the sum of both uses, delivered once. A parameter shared across blocks cannot be
  streamed and is refused.
- Buffers are not in checkpoints (rotary `inv_freq`) and are meta after a meta build: each is
  allocated on the device and set by the model's own `_init_weights`, as `from_pretrained` sets
  them (params stay meta, so their random init is a no-op). Persistent buffers, if a class has
  any, are requested from `weights` with the parameters.
- Gradients (`gradients`): activation checkpointing at block boundaries. The forward keeps each
  block's input; the loss is a function of small per-batch statistics of the logits
  (`statistic`, e.g. per-window mean NLL), so only one batch's logits exist at a time: the
  statistics are computed without grad, the loss's gradient with respect to them is taken, then
  each batch's head is rerun with grad; each block is rerun from its stored input with grad and
  backpropagated, its weights' gradients handed to `on_grad` and freed, its input's gradient
  passed to the block before; the embedding's gradient comes last (the prologue's small graph,
  the token lookup, is kept).
- The hook point (`hidden_states(..., on_block=)`) gives a caller each materialized block and
  the masks of the batches as they run through it (Hessian collection, DESIGN §4).

Memory, with P_out the parameters outside the stack, P_blk one block's, N x T the tokens of all
batches, d the hidden size, V the vocabulary, b the bytes per value (4 in fp32):
- forward (`window_nlls`, `hidden_states`): b (P_out + P_blk) + about one boundary b N T d
  + one batch through one block + one batch's logits b B T V + the captured block arguments
  (masks and rotary tables per batch, shared by the layers).
- gradients: 2 b (P_out + P_blk) (weights and their gradients) + (L + 2) boundaries b N T d
  (every block's input, kept for the backward, and the gradient in flight) + one batch's
  activations through one block with its autograd state + one batch's logits with theirs + the
  embedding's graph (token ids; BLOOM's embedding norm keeps its input: one boundary more).
Only the boundaries grow with depth L (Llama-2-7B, 8 windows of 512 tokens: 67 MB each, 2.2 GB
for 33); `store="cpu"` keeps them in host memory when the device is a GPU. The weights held never
depend on depth (Llama-2-7B fp32: P_out 1.05 GB untied, P_blk 0.81 GB).
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from ..errors import MergeCliError
from ..models.architecture import decoder_layers
from ..models.lora import LoraAdapter
from ..models.safetensors_io import Checkpoint
from .perplexity import next_token_nll
from .taskvectors import by_canonical

if TYPE_CHECKING:
    from ..models.architecture import Architecture
    from ..models.reference import ModelSource
    from .calibration import Windows

Weights = Callable[[list[str]], dict[str, torch.Tensor]]  # module-tree names -> tensors (any device, dtype)
Batch = tuple[torch.Tensor, torch.Tensor]  # input ids, attention mask (batch x seq_len)
Call = tuple[tuple, dict, bool]  # a block's arguments after the hidden state, and whether that came first


class StoredWeights:
    """`Weights` read from a checkpoint (`StreamedModel.checkpoint_weights`), with the names of the
    module-tree tensors it holds."""

    def __init__(self, fetch: Weights, names: frozenset[str]) -> None:
        self._fetch = fetch
        self.names = names

    def __call__(self, names: list[str]) -> dict[str, torch.Tensor]:
        return self._fetch(names)


class _Stop(Exception):
    """Ends the model's own forward at the last block (what follows needs the stack's output), or
    as soon as a stub finds the hidden state was not handed on as it guessed (`_prologue`)."""


def window_means(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The token-mean next-token NLL of each window of a batch (differentiable)."""
    nll, valid = next_token_nll(logits, ids, mask)
    return (nll * valid).sum(dim=1) / valid.sum(dim=1).clamp(min=1)


def mean_of(values: list[torch.Tensor]) -> torch.Tensor:
    """The mean over every window of every batch's statistic."""
    return torch.cat(values).mean()


class StreamedModel:
    """A causal LM of `config` run block by block on `device` in `dtype` (see the module's doc)."""

    def __init__(self, config: Any, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 store: torch.device | str | None = None) -> None:
        from transformers import AutoModelForCausalLM, PreTrainedModel

        try:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
        except Exception as exc:  # noqa: BLE001 - transformers raises many kinds for unknown configs
            raise MergeCliError(f"model_type {getattr(config, 'model_type', '?')!r} is not a causal LM "
                                f"transformers can build ({str(exc).splitlines()[0]})") from None
        self.model = model.eval()
        self.device, self.dtype = torch.device(device), dtype
        self.store = torch.device(store) if store is not None else self.device
        self.layers = decoder_layers(model)
        self.stack = next(name for name, m in model.named_modules() if m is self.layers)
        self._tuple = False  # whether the blocks return a tuple (found by the stubs, confirmed by a real block)
        # every tensor the weights give, under its first name (a tied pair is one), with its slots
        self._meta: dict[str, torch.Tensor] = {}
        self._slots: dict[str, list[tuple[nn.Module, str]]] = {}
        self.canonical: dict[str, str] = {}  # every parameter / persistent buffer name -> its first name
        first: dict[int, str] = {}
        persistent = set(model.state_dict())
        named = [*model.named_parameters(remove_duplicate=False),
                 *((n, b) for n, b in model.named_buffers(remove_duplicate=False) if n in persistent)]
        for name, tensor in named:
            canonical = first.setdefault(id(tensor), name)
            owner, _, attr = name.rpartition(".")
            self._meta.setdefault(canonical, tensor)
            self._slots.setdefault(canonical, []).append((model.get_submodule(owner), attr))
            self.canonical[name] = canonical
        regions: dict[str, set[str]] = {}
        for name, canonical in self.canonical.items():
            regions.setdefault(canonical, set()).add(self._region(name))
        shared = next((n for n, r in regions.items() if len(r) > 1), None)
        if shared is not None:
            raise MergeCliError(f"{type(model).__name__}: {shared} is shared by {', '.join(sorted(regions[shared]))}; "
                                "a weight used by several blocks cannot be streamed block by block")
        self.outer = [n for n in self._meta if self._region(n) == "outer"]
        self.blocks = [[n for n in self._meta if self._region(n) == str(i)] for i in range(len(self.layers))]
        # buffers (rotary tables...) are in no checkpoint: set on the device as from_pretrained sets them
        owners = [(n, m) for n, m in model.named_modules() if isinstance(m, PreTrainedModel)]
        with torch.no_grad():
            for path, module in model.named_modules():
                if not any(b is not None for b in module._buffers.values()):
                    continue
                for key, buffer in module._buffers.items():
                    if buffer is not None:
                        module._buffers[key] = torch.empty_like(buffer, device=self.device)
                owner = max((o for o in owners if o[0] in ("", path) or path.startswith(o[0] + ".")),
                            key=lambda o: len(o[0]))[1]
                owner._init_weights(module)

    @classmethod
    def from_folder(cls, folder: Path, **kwargs: Any) -> "StreamedModel":
        """The runner of the model whose config.json is in `folder` (never with the model's own code)."""
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
        except Exception as exc:  # noqa: BLE001
            raise MergeCliError(f"{folder}: cannot read config.json ({str(exc).splitlines()[0]})") from None
        return cls(config, **kwargs)

    def _region(self, name: str) -> str:
        """The block index a module-tree name is in, as text, or "outer"."""
        if not name.startswith(self.stack + "."):
            return "outer"
        return name[len(self.stack) + 1:].split(".", 1)[0]

    # -- weights --------------------------------------------------------------------------------

    def checkpoint_weights(self, checkpoint: Checkpoint, partial: bool = False,
                           only: Iterable[str] | None = None) -> "StoredWeights":
        """`weights` read lazily from a checkpoint, by transformers' own loading rules
        (`get_model_conversion_mapping`): stored names renamed to the module tree (GPT-2's legacy
        `h.0...` gets its base-model prefix, GPT-NeoX's `embed_out` is `lm_head`), and tensors that
        are converted on load assembled by the same converters from the stored tensors of the block
        asked for (a mixture of experts' one tensor per expert -> one fused tensor per layer).
        `partial`: the checkpoint holds some of the model's tensors (a merge's change where it
        changes anything): the others are left out of the answer instead of refused; `only`: of
        the stored tensors, read these (by stored name) and no others."""
        from copy import deepcopy

        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (WeightConverter, WeightRenaming, dot_natural_key,
                                                     rename_source_key)

        transforms = get_model_conversion_mapping(self.model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        converter_of = {pattern: c for c in converters for pattern in c.source_patterns}
        known = dict.fromkeys(self.canonical, True)
        sources: dict[str, list[tuple[str, str | None]]] = {}  # module name -> stored names, converter pattern
        chosen = checkpoint.names() if only is None else [n for n in checkpoint.names() if n in set(only)]
        for stored in sorted(chosen, key=dot_natural_key):  # the order transformers adds them in
            name, pattern = rename_source_key(stored, renamings, converters, self.model.base_model_prefix, known)
            if name in self.canonical:
                sources.setdefault(self.canonical[name], []).append((stored, pattern))

        def weights(names: list[str]) -> dict[str, torch.Tensor]:
            found: dict[str, torch.Tensor] = {}
            for name in names:
                if name in found or name not in sources:
                    continue
                (stored, pattern), *_ = sources[name]
                if pattern is None:
                    found[name] = checkpoint.get(stored)
                    continue
                converter = deepcopy(converter_of[pattern])
                for stored, pattern in sources[name]:
                    converter.add_tensor(name, stored, pattern, checkpoint.get(stored))
                for target, value in converter.convert(name, model=self.model, config=self.model.config).items():
                    found[self.canonical.get(target, target)] = value[0] if isinstance(value, list) else value
            missing = [n for n in names if n not in found]
            if missing and not partial:
                raise MergeCliError(f"{checkpoint.folder}: no stored tensor for {missing[0]}"
                                    + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
            return {n: found[n] for n in names if n in found}
        return StoredWeights(weights, frozenset(sources))

    def _put(self, name: str, value: torch.Tensor) -> None:
        for module, attr in self._slots[name]:
            (module._parameters if attr in module._parameters else module._buffers)[attr] = value

    @contextmanager
    def _holding(self, weights: Weights, names: list[str], grad: bool) -> Iterator[None]:
        """These tensors materialized from `weights` (as Parameters requiring grad if `grad`), then
        the meta originals put back, so nothing of them stays referenced here."""
        tensors = weights(list(names))
        try:
            for name in names:
                meta = self._meta[name]
                tensor = tensors.pop(name, None)
                if tensor is None:
                    raise MergeCliError(f"the weights supplied lack {name}")
                if tuple(tensor.shape) != tuple(meta.shape):
                    raise MergeCliError(f"{name}: shape {tuple(tensor.shape)}, the model's is {tuple(meta.shape)}")
                tensor = tensor.detach().to(self.device, self.dtype if tensor.is_floating_point() else tensor.dtype)
                self._put(name, nn.Parameter(tensor, requires_grad=grad) if isinstance(meta, nn.Parameter) else tensor)
            del tensors
            yield
        finally:
            for name in names:
                self._put(name, self._meta[name])

    def _deliver(self, names: list[str], on_grad: Callable[[str, torch.Tensor], None]) -> None:
        for name in names:
            module, attr = self._slots[name][0]
            param = module._parameters.get(attr)
            if param is not None:
                on_grad(name, param.grad if param.grad is not None else torch.zeros_like(param))

    # -- the model's own forward, around the stack ----------------------------------------------

    @contextmanager
    def _stubbed(self, stub: Callable[..., Any]) -> Iterator[None]:
        for i, layer in enumerate(self.layers):
            layer.forward = partial(stub, i)
        try:
            yield
        finally:
            for layer in self.layers:
                del layer.forward

    def _prologue(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, list[Call]]:
        """The first block's input hidden state, and every block's own other arguments. The stubs
        hand the hidden state on in the structure the blocks return (a tuple or the tensor): a
        wrong guess shows as the next block not receiving that very tensor, and is flipped."""
        last = len(self.layers) - 1
        for _ in range(2):
            calls: dict[int, tuple[tuple, dict]] = {}
            handed: list[torch.Tensor] = []

            def stub(i: int, *args: Any, **kwargs: Any) -> Any:
                hidden = args[0] if args else kwargs["hidden_states"]
                if handed and hidden is not handed[-1]:
                    raise _Stop("mismatch")
                calls[i] = (args, kwargs)
                if i == last:
                    raise _Stop
                handed.append(hidden)
                return (hidden,) if self._tuple else hidden

            with self._stubbed(stub):
                try:
                    self.model(input_ids=ids, attention_mask=mask, use_cache=False)
                except _Stop as stop:
                    if not stop.args:
                        break
                self._tuple = not self._tuple
        else:
            raise MergeCliError(f"{type(self.model).__name__}: its forward changes the hidden state between decoder "
                                "blocks; it cannot be run block by block")
        if sorted(calls) != list(range(last + 1)):
            raise MergeCliError(f"{type(self.model).__name__}: its forward did not call each of its "
                                f"{last + 1} decoder blocks; it cannot be run block by block")
        first, found = None, []
        for i in range(last + 1):
            args, kwargs = calls[i]
            if args:
                hidden, call = args[0], (args[1:], kwargs, True)
            else:
                kwargs = dict(kwargs)
                hidden, call = kwargs.pop("hidden_states"), ((), kwargs, False)
            first = hidden if i == 0 else first
            found.append(call)
        return first, found

    def _run(self, block: nn.Module, hidden: torch.Tensor, call: Call) -> torch.Tensor:
        args, kwargs, positional = call
        out = block(hidden, *args, **kwargs) if positional else block(hidden_states=hidden, **kwargs)
        self._tuple = isinstance(out, tuple)
        return out[0] if self._tuple else out

    def _head(self, hidden: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The logits of the model whose stack outputs `hidden`."""
        last = len(self.layers) - 1

        def stub(i: int, *args: Any, **kwargs: Any) -> Any:
            handed = hidden if i == last else args[0] if args else kwargs["hidden_states"]
            return (handed,) if self._tuple else handed

        with self._stubbed(stub):
            return self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits

    # -- the stack --------------------------------------------------------------------------------

    def _placed(self, batches: Iterable[Batch]) -> list[Batch]:
        return [(ids.to(self.device), mask.to(self.device)) for ids, mask in batches]

    def _through(self, block: nn.Module, i: int, states: list, inputs: list, batches: list[Batch],
                 out: list, keep: bool) -> Iterator[torch.Tensor]:
        """Each batch through block `i`, its attention mask yielded just before it runs."""
        for b, (_, mask) in enumerate(batches):
            yield mask
            out.append(self._run(block, states[b].to(self.device), inputs[b][1][i]).to(self.store))
            if not keep:
                states[b] = None  # this boundary is no longer needed

    def _forward(self, weights: Weights, batches: list[Batch], inputs: list,
                 on_block: Callable[[int, nn.Module, Iterator[torch.Tensor]], None] | None = None,
                 keep: bool = False) -> list[list[torch.Tensor]]:
        """The boundaries: every block's input (`keep`) or only the last block's output."""
        states = [hidden.detach().to(self.store) for hidden, _ in inputs]
        kept = [states]
        for i, block in enumerate(self.layers):
            with self._holding(weights, self.blocks[i], grad=False):
                out: list[torch.Tensor] = []
                run = self._through(block, i, states, inputs, batches, out, keep)
                if on_block is not None:
                    on_block(i, block, run)
                for _ in run:  # whatever batches the hook left
                    pass
            states = out
            kept = [*kept, out] if keep else [out]
        return kept

    def hidden_states(self, weights: Weights, batches: Iterable[Batch],
                      on_block: Callable[[int, nn.Module, Iterator[torch.Tensor]], None] | None = None
                      ) -> list[torch.Tensor]:
        """The last block's output per batch. `on_block(index, block, masks)`, if given, is called
        while block `index` is materialized (its modules named `f"{self.stack}.{index}.{name}"`),
        before any batch runs through it; iterating `masks` runs the batches one by one, each
        batch's attention mask given just before it runs (so a hook that skips padding knows which
        tokens count); batches it did not iterate run after it returns. Register hooks on the
        block's modules, iterate, then remove them: collection without the model loaded."""
        batches = self._placed(batches)
        with torch.no_grad(), self._holding(weights, self.outer, grad=False):
            return self._forward(weights, batches, [self._prologue(*batch) for batch in batches], on_block)[-1]

    def window_nlls(self, weights: Weights, windows: "Windows", batch_size: int) -> list[tuple[float, int]]:
        """(NLL sum, predicted tokens) of every window over non-pad positions, as
        `perplexity.window_nlls` gives on the loaded model."""
        batches = self._placed(windows.batches(batch_size))
        found: list[tuple[float, int]] = []
        with torch.no_grad(), self._holding(weights, self.outer, grad=False):
            states = self._forward(weights, batches, [self._prologue(*batch) for batch in batches])[-1]
            for (ids, mask), hidden in zip(batches, states):
                nll, valid = next_token_nll(self._head(hidden.to(self.device), ids, mask), ids, mask)
                sums = (nll.double() * valid).sum(dim=1)
                found += [(float(s), int(n)) for s, n in zip(sums, valid.sum(dim=1))]
        return found

    def gradients(self, weights: Weights, batches: Sequence[Batch], on_grad: Callable[[str, torch.Tensor], None],
                  statistic: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] = window_means,
                  loss: Callable[[list[torch.Tensor]], torch.Tensor] = mean_of) -> float:
        """The loss `loss([statistic(logits_b, ids_b, mask_b) for each batch b])` (a scalar), and its
        gradient with respect to every weight tensor, handed to `on_grad(name, grad)` one block at a
        time (last block first, the tensors outside the stack last; zeros for a weight the loss does
        not reach) and freed when it returns: reduce it there. Returns the loss."""
        batches = self._placed(batches)
        with self._holding(weights, self.outer, grad=True):
            with torch.enable_grad():  # the embedding's graph is kept for its gradient, at the end
                inputs = [self._prologue(*batch) for batch in batches]
            if any(t.requires_grad for _, calls in inputs for call in calls for t in _tensors(call[:2])):
                raise MergeCliError(f"{type(self.model).__name__} passes its blocks inputs computed from weights "
                                    "besides the hidden state; their gradients cannot be streamed")
            with torch.no_grad():
                bounds = self._forward(weights, batches, inputs, keep=True)
                values = [statistic(self._head(h.to(self.device), *batch), *batch)
                          for h, batch in zip(bounds[-1], batches)]
            leaves = [v.detach().requires_grad_() for v in values]
            with torch.enable_grad():
                total = loss(leaves)
                total.backward()
            grads = []
            for leaf, hidden, batch in zip(leaves, bounds.pop(), batches):
                hidden = hidden.to(self.device).requires_grad_()
                if leaf.grad is not None:
                    with torch.enable_grad():
                        statistic(self._head(hidden, *batch), *batch).backward(leaf.grad)
                grads.append(hidden.grad if hidden.grad is not None else torch.zeros_like(hidden))
            for i in reversed(range(len(self.layers))):
                states = bounds.pop()
                with self._holding(weights, self.blocks[i], grad=True):
                    for b, (_, calls) in enumerate(inputs):
                        x = states[b].to(self.device).requires_grad_()
                        states[b] = None
                        with torch.enable_grad():
                            torch.autograd.backward(self._run(self.layers[i], x, calls[i]), grads[b])
                        grads[b] = x.grad
                    self._deliver(self.blocks[i], on_grad)
            for (first, _), grad in zip(inputs, grads):
                if first.requires_grad:
                    first.backward(grad)
            self._deliver(self.outer, on_grad)
        return float(total.detach())


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    """Every tensor in nested tuples, lists and dicts."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


def source_weights(runner: StreamedModel, source: "ModelSource", base: Path, arch: "Architecture",
                   use_base: bool = False) -> StoredWeights:
    """The weights of a model to run block by block: a full checkpoint as stored; a LoRA adapter as
    its base plus the adapter's change of each tensor it targets (`models.lora`, as its task vector
    is computed: what peft's merge adds); with `use_base`, the base."""
    if use_base or source.kind != "lora":
        return runner.checkpoint_weights(Checkpoint.open(base if use_base else source.path))
    base_ckpt = Checkpoint.open(base)
    stored, adapter = by_canonical(base_ckpt, arch), LoraAdapter(source.path)
    targets = set(adapter.tensor_names(arch))
    plain = runner.checkpoint_weights(base_ckpt)

    def weights(names: list[str]) -> dict[str, torch.Tensor]:
        found = plain(names)
        for name in names:
            key = arch.canonical(arch.checkpoint_name(name))
            if key in targets:
                found[name] = found[name].float() + adapter.delta(key, stored[key], base_ckpt, arch)
        return found
    return StoredWeights(weights, plain.names)


def model_weights(model: nn.Module) -> Weights:
    """A loaded model's own tensors as `weights` (the same model run block by block: tests and
    benchmarks compare the two runners on it)."""
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    return lambda names: {n: state[n].detach() for n in names}
