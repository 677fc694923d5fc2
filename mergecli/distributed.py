"""One process of several: the `torchrun` process group, and the few collective steps stages need.

Under `torchrun` (or `python -m torch.distributed.run`, and so `accelerate launch` or SLURM's
`srun torchrun ...`) every process finds its rank and the rendezvous address in its environment.
`join` reads that environment once, initialises the process group (nccl when the device is a CUDA
GPU, gloo otherwise, `--backend` to choose) and returns the `Group` the Context carries. Without
torchrun it returns `SINGLE`, a group of one whose collective steps are plain calls, so each stage
has one code path and asks the group (`main`, `share`, `balance`, `decide`, `reduce_sum`,
`gather`), never the environment.

Failure: a process that dies closes its connections, and gloo fails the others' next collective
at once ("connection closed by peer"); nccl, and any process that stops answering, fail at the
group's timeout (`--dist-timeout`). Either becomes `PeerFailed`, one line. An error a process
reports itself is printed once, by the first process that reports it (`should_print`): the
rendezvous store, which lives in the torchrun agent, counts who said what.

This module imports torch only inside `join` and the collectives: `--help` stays fast.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import time
from collections import Counter
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, TypeVar

from .errors import MergeCliError
from .progress import Reporter

if TYPE_CHECKING:
    import torch

T = TypeVar("T")
DEFAULT_TIMEOUT = 1800.0  # seconds; torch's own default for gloo
_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class PeerFailed(MergeCliError):
    """Another process of the job stopped (killed, crashed, or failed with its own error) or did not
    answer within the timeout."""


@dataclass(frozen=True)
class Group:
    """The processes of one launch; `SINGLE` when mergecli runs alone (no process group)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None  # None: no process group
    timeout: float = DEFAULT_TIMEOUT
    store: Any = None  # the rendezvous store: progress counters and error reports

    @property
    def main(self) -> bool:
        """Rank 0: the one that takes workspace locks, writes the manifest and shared files, logs."""
        return self.rank == 0

    @property
    def launched(self) -> bool:
        return self.backend is not None

    def local_device(self, device: str) -> str:
        """A bare `cuda` means this process's own GPU, `cuda:LOCAL_RANK`, under torchrun."""
        return f"cuda:{self.local_rank}" if self.launched and device == "cuda" else device

    # -- splitting work -------------------------------------------------------------------------
    def share(self, n: int) -> range:
        """This rank's contiguous part of n items in order (parts differ in size by at most one)."""
        return range(self.rank * n // self.world, (self.rank + 1) * n // self.world)

    def balance(self, sizes: list[int]) -> list[int]:
        """The rank of each item, balanced by size: largest first, each to the least-loaded rank
        (ties: the earlier item, the lower rank), so every rank computes the same answer."""
        load = [0] * self.world
        owner = [0] * len(sizes)
        for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
            rank = min(range(self.world), key=lambda r: (load[r], r))
            owner[index] = rank
            load[rank] += sizes[index]
        return owner

    # -- collective steps -----------------------------------------------------------------------
    def decide(self, fn: Callable[[], T]) -> T:
        """fn() run on rank 0; every rank gets its value, or raises its error."""
        if not self.launched:
            return fn()
        outcome: list[Any] = [None]
        error: Exception | None = None
        if self.main:
            try:
                outcome[0] = (True, fn())
            except Exception as exc:  # noqa: BLE001 - every rank raises it below
                error = exc
                outcome[0] = (False, exc if _picklable(exc) else PeerFailed(f"rank 0 failed: {type(exc).__name__}: {exc}"))
        import torch.distributed as dist

        with self._collective("waiting for rank 0"):
            dist.broadcast_object_list(outcome, src=0)
        ok, value = outcome[0]
        if ok:
            return value
        raise error or value

    @contextmanager
    def lead(self, enter: Callable[[], AbstractContextManager[T]]) -> Iterator[T]:
        """A context (a lock, a temporary folder) entered on rank 0 only, for the whole block;
        every rank gets what it yields, or raises the error entering it raised."""
        with ExitStack() as stack:
            yield self.decide(lambda: stack.enter_context(enter()))

    def gather(self, value: T) -> list[T]:
        """Every rank's value, in rank order, on every rank (small Python objects)."""
        if not self.launched:
            return [value]
        import torch.distributed as dist

        found: list[Any] = [None] * self.world
        with self._collective("gathering results"):
            dist.all_gather_object(found, value)
        return found

    def reduce_sum(self, tensor: "torch.Tensor") -> "torch.Tensor":
        """The sum over ranks of each rank's `tensor`, on rank 0 (the others get theirs back).
        Floats are added in fp64, so the result does not depend on the order the backend adds the
        ranks' parts in; integers exactly."""
        if not self.launched:
            return tensor
        import torch
        import torch.distributed as dist

        wide = tensor.to(self._device, torch.float64 if tensor.is_floating_point() else torch.int64)
        with self._collective("adding up the ranks' results"):
            dist.reduce(wide, dst=0)
        return wide.to(tensor.device, tensor.dtype) if self.main else tensor

    def all_sum(self, tensor: "torch.Tensor") -> "torch.Tensor":
        """The sum over ranks of each rank's `tensor`, on every rank (small tensors: gradients of a
        few scales), added in fp64 like `reduce_sum`."""
        if not self.launched:
            return tensor
        import torch
        import torch.distributed as dist

        wide = tensor.to(self._device, torch.float64)
        with self._collective("adding up the ranks' results"):
            dist.all_reduce(wide)
        return wide.to(tensor.device, tensor.dtype)

    @property
    def _device(self) -> str:
        return f"cuda:{self.local_rank}" if self.backend == "nccl" else "cpu"

    @contextmanager
    def _collective(self, what: str) -> Iterator[None]:
        try:
            yield
        except MergeCliError:
            raise
        except Exception as exc:  # noqa: BLE001 - gloo and nccl raise RuntimeError and subclasses
            raise PeerFailed(f"{what} failed: another process of the job stopped or did not "
                             f"answer within {self.timeout:g} s ({_first_line(exc)})",
                             "rerun the same command (any number of processes): what finished is reused") from None

    # -- errors ---------------------------------------------------------------------------------
    def should_print(self, message: str, consequence: bool) -> bool:
        """Whether this process prints its error: the first to report a given message does; an
        error that only follows another's (`consequence`) is printed only if no process said
        anything. Without a store (or if the agent holding it is gone) every process prints."""
        if self.store is None:
            return True
        try:
            if consequence:
                return self.store.add("mergecli/errors", 0) == 0 and self.store.add("mergecli/error/peer", 1) == 1
            self.store.add("mergecli/errors", 1)
            digest = hashlib.sha256(message.encode()).hexdigest()[:16]
            return self.store.add(f"mergecli/error/{digest}", 1) == 1
        except Exception:  # noqa: BLE001 - the store is gone with the agent: say it anyway
            return True

    def failed_elsewhere(self) -> bool:
        """Whether some process has reported an error (seen while waiting on the others)."""
        return self.store is not None and self.store.add("mergecli/errors", 0) > 0

    def close(self) -> None:
        if self.launched:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


SINGLE = Group()


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in _ENV)


def join(device: str = "cpu", backend: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> Group:
    """The process group of this launch (initialised here), or `SINGLE` outside torchrun."""
    if not launched_by_torchrun():
        return SINGLE
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda") and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(torch.device(device if device != "cuda" else f"cuda:{local_rank}"))
    backend = backend or ("nccl" if cuda else "gloo")
    wait = timedelta(seconds=timeout)
    try:
        store, rank, world = next(dist.rendezvous("env://", timeout=wait))
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=wait)
    except Exception as exc:  # noqa: BLE001 - unknown backend, unreachable rendezvous, timeout
        raise MergeCliError(f"cannot join the torchrun process group with backend {backend!r}: {_first_line(exc)}",
                            "check --backend (gloo, nccl) and that every process was started") from None
    return Group(rank, world, local_rank, backend, timeout, store)


class SharedProgress:
    """The reporter of one process of several. Logs come from rank 0 only. Every rank opens the
    same progress tasks (same description, total = the work of all ranks) and adds its own
    advances to a counter in the rendezvous store; rank 0 alone shows the bar, at the counter's
    value, so its rate is the aggregate rate. Leaving a task, rank 0 waits until the counter
    reaches the total (the others finishing their part), unless a process reports an error or no
    progress is made for the group's timeout."""

    def __init__(self, inner: Reporter, group: Group, poll: float = 0.1) -> None:
        self.inner = inner
        self.group = group
        self.poll = poll
        self._opened: Counter[str] = Counter()

    def log(self, message: str) -> None:
        if self.group.main:
            self.inner.log(message)

    @contextmanager
    def track(self, description: str, total: int) -> Iterator[Callable[[int], None]]:
        self._opened[description] += 1
        key = f"mergecli/progress/{self._opened[description]}/{description}"
        store = self.group.store
        if not self.group.main:
            yield lambda n=1: store.add(key, n)
            return
        with self.inner.track(description, total) as show:
            shown = 0

            def refresh(n: int = 0) -> int:
                nonlocal shown
                value = store.add(key, n)
                show(value - shown)
                shown = value
                return value

            yield refresh
            last, since = refresh(), time.monotonic()
            while last < total:
                if self.group.failed_elsewhere():
                    raise PeerFailed(f"{description}: another process failed (its error is above)")
                if time.monotonic() - since > self.group.timeout:
                    raise PeerFailed(f"{description}: no progress from the other processes for "
                                     f"{self.group.timeout:g} s ({last} of {total} done)", "see --dist-timeout")
                time.sleep(self.poll)
                value = refresh()
                if value != last:
                    last, since = value, time.monotonic()


def _picklable(exc: BaseException) -> bool:
    try:
        pickle.loads(pickle.dumps(exc))
        return True
    except Exception:  # noqa: BLE001
        return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
