"""torchrun: the stages in several real processes (gloo on CPU) give the single-process results.

Hessians equal the single process's to fp32 summation order (token counts exactly), merges bit for
bit whatever the number of processes, perplexities; a two-"node" job on one machine; a process
killed mid-run makes the job fail fast, leaves nothing half-written trusted, and the same command
then completes (with any number of processes) with the clean run's bytes. Every launch runs the
processes with one torch thread each, as torchrun does."""

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file
from torch.distributed import HashStore
from typer.testing import CliRunner

from helpers import write_recipe
from mergecli.app.cli import app
from mergecli.distributed import Group, PeerFailed, SharedProgress
from mergecli.models.safetensors_io import ShardedWriter, TensorInfo
from mergecli.progress import SILENT
from mergecli.store.outputs import read_stamp, stamp_problem
from mergecli.store.workspace import Workspace

runner = CliRunner()
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
CODE = [f"def f{i}(x):\n    return x * {i} + {i + 1}\n" for i in range(80)]
VERSE = [f"Shall I compare thee to a summer's day, number {i}? Thou art more lovely." for i in range(80)]
MERGES = ["ties", "dare", "sg", "regmean"]
HESSIAN_TOLERANCE = 1e-6  # max |H_n - H_1| / max |H_1| per input group (measured: ~1e-7)


def launcher(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args, "-m", "mergecli", "-q"]


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    done = subprocess.run(launcher("--standalone", f"--nproc-per-node={nproc}") + list(args),
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def weights(out: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}


def same_merges(a: Path, b: Path) -> bool:
    """Every variant holds the same tensors with the same bytes (shard files may differ)."""
    for name in MERGES:
        left, right = weights(a / name), weights(b / name)
        if left.keys() != right.keys() or not all(torch.equal(left[k], right[k]) for k in left):
            return False
    return True


def hessians(ws: Path) -> dict[str, tuple[dict[str, torch.Tensor], dict]]:
    found = {}
    for artifact in Workspace(ws).artifacts():
        if artifact.kind == "hessian":
            found[artifact.label] = (load_file(artifact.path / "hessian.safetensors"),
                                     json.loads((artifact.path / "hessian.json").read_text()))
    return found


def keep_only(ws: Path, kinds: set[str]) -> None:
    """Drop every artifact of the other kinds (as if only those stages had run)."""
    workspace = Workspace(ws)
    for artifact in workspace.artifacts():
        if artifact.kind not in kinds:
            workspace.remove(artifact.key)


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, models) -> Path:
    """Three fine-tunes: with two processes, a and b are collected one per process, c by both."""
    root = tmp_path_factory.mktemp("dist")
    (root / "code.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in CODE))
    (root / "verse.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in VERSE))
    return write_recipe(root / "r.yaml", str(models / "base"), [
        {"name": "a", "model": str(models / "ft_a"), "dataset": {"path": "./code.jsonl"}},
        {"name": "b", "model": str(models / "ft_b"), "dataset": {"path": "./verse.jsonl"}},
        {"name": "c", "model": str(models / "lora_c"), "dataset": {"path": "./verse.jsonl"}},
    ], [{"name": "ties", "method": "ties"}, {"name": "dare", "method": "dare_ties", "seed": 3},
        {"name": "sg", "method": "ties", "score": "sparsegpt", "compensate": True},
        {"name": "regmean", "method": "regmean"}],
        calibration={"samples": 6, "seq_len": 16, "batch_size": 2}, evaluation={"samples": 4, "seq_len": 16},
        shard_size="40KB")


@pytest.fixture(scope="module")
def single(recipe) -> list[dict]:
    """One process: hessian, then compare (a copy of the workspace keeps only the task vectors and
    Hessians, for the two-process run to merge and evaluate from the same statistics)."""
    root = recipe.parent
    assert runner.invoke(app, ["hessian", str(recipe), "workspace=ws1"]).exit_code == 0
    shutil.copytree(root / "ws1", root / "ws_stats")
    keep_only(root / "ws_stats", {"taskvec", "hessian"})
    result = runner.invoke(app, ["--json", "compare", str(recipe), "workspace=ws1", "output_dir=out1"])
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def clean(recipe) -> Path:
    """Two processes from an empty workspace: the reference for reruns after a kill."""
    torchrun("merge", str(recipe), "workspace=ws_clean", "output_dir=out_clean")
    return recipe.parent


def same_statistics(ws: Path, reference: Path, exact: bool) -> bool:
    """The same Hessian sets: token counts exactly, sums bit for bit or to HESSIAN_TOLERANCE."""
    ours, theirs = hessians(ws), hessians(reference)
    if ours.keys() != theirs.keys() or len(ours) != 3:
        return False
    for label, (sums, meta) in theirs.items():
        other, other_meta = ours[label]
        if other_meta["counts"] != meta["counts"] or other_meta["tokens"] != meta["tokens"]:
            return False
        for group, h in sums.items():
            if not (torch.equal(other[group], h) if exact else
                    (other[group] - h).abs().max() <= HESSIAN_TOLERANCE * h.abs().max()):
                return False
    return True


def test_two_processes_merge_and_evaluate_like_one(recipe, single):
    """From the same statistics: merges bit for bit, perplexities; one JSON document (rank 0 alone
    prints it)."""
    root = recipe.parent
    done = torchrun("--json", "compare", str(recipe), "workspace=ws_stats", "output_dir=out2")
    rows = json.loads(done.stdout)
    assert same_merges(root / "out1", root / "out2")
    assert len(list((root / "out2" / "ties").glob("model-*.safetensors"))) == 4  # two processes' shards
    assert [r["model"] for r in rows] == [r["model"] for r in single]
    for mine, theirs in zip(rows, single):
        for key in ("ppl_a", "ppl_b", "ppl_c"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-6), (mine["model"], key)
    assert not list(root.glob("out2/.*.tmp")) and not list(root.glob("ws_stats/*/.*.tmp"))


def test_two_processes_collect_the_single_process_statistics(recipe, single):
    """a and b collected one per process, c by both (its windows split, the sums reduced)."""
    torchrun("hessian", str(recipe), "workspace=ws_h")
    assert same_statistics(recipe.parent / "ws_h", recipe.parent / "ws1", exact=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_two_node_job_on_one_machine_writes_the_same_bytes(recipe, clean):
    root = recipe.parent
    port = free_port()
    nodes = [subprocess.Popen(launcher("--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
                                       f"--rdzv-endpoint=localhost:{port}", f"--rdzv-id=job{port}")
                              + ["merge", str(recipe), "workspace=ws_nodes", "output_dir=out_nodes"],
                              stderr=subprocess.PIPE, text=True, env=ENV) for _ in range(2)]
    for node in nodes:
        _, err = node.communicate(timeout=300)
        assert node.returncode == 0, err[-3000:]
    assert same_statistics(root / "ws_nodes", root / "ws_clean", exact=True)
    assert same_merges(root / "out_clean", root / "out_nodes")


@pytest.mark.slow
@pytest.mark.parametrize("moment,rerun_procs", [("hessian", 2), ("merge", 1)])
def test_a_killed_process_fails_the_job_fast_and_the_rerun_completes(recipe, clean, moment, rerun_procs):
    """Kill rank 1 once the job is collecting statistics (rerun: two processes) or writing a merge
    (rerun: one process, reusing the statistics the killed job recorded). Merges that read no
    statistics come out bit for bit; the others equal the clean run's when the statistics do."""
    root = recipe.parent
    ws, out = root / f"ws_kill_{moment}", root / f"out_kill_{moment}"
    job = subprocess.Popen(launcher("--standalone", "--nproc-per-node=2")
                           + ["merge", str(recipe), f"workspace={ws.name}", f"output_dir={out.name}"],
                           stderr=subprocess.PIPE, text=True, env=ENV)
    reached = (lambda: (ws / "hessian").is_dir()) if moment == "hessian" else (lambda: any(out.glob(".*.tmp")))
    deadline = time.monotonic() + 300
    while not reached():
        assert job.poll() is None and time.monotonic() < deadline, f"never reached {moment}"
        time.sleep(0.005)
    rank1 = next(p for p in psutil.Process(job.pid).children() if p.environ().get("RANK") == "1")
    rank1.kill()
    killed = time.monotonic()
    _, err = job.communicate(timeout=120)
    assert job.returncode != 0 and time.monotonic() - killed < 30, err[-2000:]
    workspace = Workspace(ws)
    assert all(Workspace.verify(a) is None for a in workspace.artifacts())  # nothing half-written is listed
    for folder in (out.iterdir() if out.is_dir() else []):
        if not folder.name.startswith("."):  # a published variant is complete
            assert stamp_problem(folder, read_stamp(folder)) is None
    torchrun("merge", str(recipe), f"workspace={ws.name}", f"output_dir={out.name}", nproc=rerun_procs)
    assert not list(out.glob(".*.tmp"))
    if moment == "merge":  # the killed job recorded every Hessian: the same bytes as the clean run
        assert same_statistics(ws, root / "ws_clean", exact=True) and same_merges(root / "out_clean", out)
        return
    # the rerun shares out only the fine-tunes still missing, so one may be summed in another order
    assert same_statistics(ws, root / "ws_clean", exact=False)
    assert all(torch.equal(weights(root / "out_clean" / name)[k], v)
               for name in ("ties", "dare") for k, v in weights(out / name).items())


# -- the pieces, in one process -------------------------------------------------------------
def test_shares_cover_every_item_once_and_balance_by_size():
    for n in (0, 1, 5, 16):
        parts = [list(Group(rank=r, world=3).share(n)) for r in range(3)]
        assert sum(parts, []) == list(range(n)) and max(map(len, parts)) - min(map(len, parts)) <= 1
    sizes = [7, 5, 4, 3, 3, 2, 2, 1]  # 27 bytes: largest first to the lighter rank gives 14 / 13
    owners = Group(world=2).balance(sizes)
    assert [sum(s for s, o in zip(sizes, owners) if o == r) for r in range(2)] == [14, 13]
    assert owners == Group(world=2).balance(sizes)


def test_shards_written_by_several_processes_hold_the_same_tensors(tmp_path):
    infos = [TensorInfo(f"t{i}", (i + 1, 8), torch.float32) for i in range(7)]
    values = {i.name: torch.randn(i.shape) for i in infos}
    owners = Group(world=2).balance([i.nbytes for i in infos])
    for rank in range(2):  # each "process" writes its own shards into the one folder
        with ShardedWriter(tmp_path, infos, 100, owners=owners, rank=rank) as writer:
            for info in writer.order:
                writer.write(info.name, values[info.name])
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(values) and set(index["weight_map"].values()) == {
        p.name for p in tmp_path.glob("*.safetensors")}
    assert all(torch.equal(values[k], v) for k, v in weights(tmp_path).items()) and len(weights(tmp_path)) == 7
    assert writer.all_files == sorted(set(index["weight_map"].values())) + ["model.safetensors.index.json"]


def test_rank_zero_shows_the_sum_of_every_rank_and_waits_for_them():
    store = HashStore()
    seen: list[int] = []

    class Recorder:
        def log(self, message):
            seen.append(message)

        def track(self, description, total):
            from contextlib import contextmanager

            @contextmanager
            def tracked():
                yield lambda n: seen.append(n)
            return tracked()

    main = SharedProgress(Recorder(), Group(rank=0, world=2, backend="gloo", store=store), poll=0.01)
    other = SharedProgress(SILENT, Group(rank=1, world=2, backend="gloo", store=store))

    def rank1():
        with other.track("job", 10) as advance:
            for _ in range(6):
                time.sleep(0.02)
                advance(1)
    worker = threading.Thread(target=rank1)
    worker.start()
    with main.track("job", 10) as advance:
        advance(4)
    worker.join()
    other.log("not shown")
    assert sum(n for n in seen if isinstance(n, int)) == 10 and "not shown" not in seen


def test_waiting_rank_zero_fails_when_another_reports_an_error_and_errors_print_once():
    store = HashStore()
    zero, one = (Group(rank=r, world=2, backend="gloo", store=store, timeout=60) for r in range(2))
    assert one.should_print("bad recipe", consequence=False)
    assert not zero.should_print("bad recipe", consequence=False)  # the same line, once
    assert not zero.should_print("peer gone", consequence=True)  # follows an error already shown
    with pytest.raises(PeerFailed, match="another process failed"):
        with SharedProgress(SILENT, zero, poll=0.01).track("job", 2) as advance:
            advance(1)
    alone = Group(rank=0, world=2, backend="gloo", store=HashStore(), timeout=0.1)
    with pytest.raises(PeerFailed, match="no progress"):
        with SharedProgress(SILENT, alone, poll=0.01).track("job", 2):
            pass
    assert alone.should_print("peer gone", consequence=True)  # nobody said anything: say it
