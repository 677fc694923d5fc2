"""`mergecli moe CONFIG`: a mixture of experts from a mergekit-moe config, into a stamped folder.

Not a stage: a mergekit-moe config is no recipe (no fine-tunes of one base to merge, no
workspace), and the only costly step, the prompts' hidden states, is a handful of short forwards
of the base, so nothing is cached but the output folder itself, which is treated as every merged
folder is (`store.outputs`): built under a temporary name beside its place and renamed into it,
stamped with the key of everything it depends on (the config, each input's fingerprint, the seed
where the gates are random, the code's format), reused when the stamp matches and every file is
intact, replaced only if mergecli wrote it, never inside an input (`stages.base.guard_target`), one
run at a time (a lock beside it). One process: the prompts are too few to share out (under
torchrun the command is refused, like every command but the stages).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import MergeCliError, ModelMismatchError, RecipeError, WorkspaceBusyError
from ..fsutil import OWNER_MARKER, building, file_record, locked, publish
from ..progress import SILENT, Reporter
from ..recipe.moe import RANDOM_MODES, MoEConfig, read_moe_config
from ..stages.base import View, check_device, guard_target
from ..store.artifacts import ArtifactSpec
from ..store.outputs import ROLE, STAMP, check_replaceable, current, ours, read_stamp
from ..version import __version__
from ..models.reference import resolve_model, resolve_reference

SHARD_BYTES = 2 * 10**9  # the recipes' default shard_size


class MoESpec(ArtifactSpec):
    """Everything a mixture folder depends on (its stamp's key)."""

    kind = "moe"
    format = 1
    config: dict[str, Any]
    models: tuple[str, ...]  # fingerprints, as `MoEConfig.models()`
    seed: int | None  # random gates only


@dataclass
class MoEResult:
    path: Path
    architecture: str  # the output's model_type: mixtral or qwen2_moe
    experts: int
    shared_experts: int
    experts_per_token: int
    gate_mode: str
    tensors: int
    seconds: float
    key: str
    reused: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path)}


def run_moe(config_path: Path | str, output: Path | str | None = None, *, reporter: Reporter = SILENT,
            device: str = "cpu", seed: int = 0, overwrite: bool = False, wait: bool = True) -> MoEResult:
    """Build the mixture a mergekit-moe config describes into `output` (default: `merged/<config
    file's name>/` beside the config); reuse it if it is current. `seed`: for gate_mode random and
    uniform_random, what mergekit-moe's --random-seed is."""

    config = read_moe_config(Path(config_path))
    torch_device = check_device(device)
    out = Path(output).absolute() if output is not None else config.root / "merged" / config.name
    sources = []
    for key, ref in config.models():
        location = resolve_reference(ref, config.root)
        if isinstance(location, Path) and not (location.exists() or location.is_symlink()):
            raise RecipeError(f"{key}: model path does not exist: {location}",
                              "paths are relative to the config's folder")
        try:
            source = resolve_model(ref, config.root)
        except MergeCliError as exc:
            raise type(exc)(f"{key}: {exc.message}", exc.hint) from None
        if source.kind != "full":
            raise ModelMismatchError(f"{key}: {source.path} is a LoRA adapter; mixture experts are full models",
                                     "merge the adapter into its base first")
        sources.append(source)
    inputs = [(f"{key} {ref!r}", path) for (key, ref), s in zip(config.models(), sources) for path in s.input_paths]
    guard_target(out, "output folder", inputs, config.path)
    check_replaceable(out, read_stamp(out))
    spec = MoESpec(config=config.data, models=tuple(s.fingerprint for s in sources),
                   seed=seed if config.gate_mode in RANDOM_MODES else None)
    try:
        with locked(out.parent / f".{out.name}.lock", wait,
                    lambda: reporter.log(f"another run is writing {out}; waiting for it to finish")):
            reused = _reusable(out, spec.key(), overwrite, reporter)
            if reused is not None:
                return reused
            result = _build(config, [s.path for s in sources], out, spec, seed, torch_device, reporter)
    except BlockingIOError:
        raise WorkspaceBusyError(f"another run is writing {out}", "wait for it, or rerun with --wait") from None
    reporter.log(f"moe: wrote {out} ({result.architecture}, {result.experts} experts) in {result.seconds:.1f} s")
    return result


def _reusable(out: Path, key: str, overwrite: bool, reporter: Reporter) -> MoEResult | None:
    found, problem = current(out, key, overwrite)
    if found is not None:
        reporter.log(f"moe: reused {out}")
        return MoEResult(**{**found, "path": out, "reused": True})
    if problem:
        reporter.log(f"[yellow]moe: {out} is damaged ({problem}); rebuilding[/]")
    return None


def _build(config: MoEConfig, sources: list[Path], out: Path, spec: MoESpec, seed: int, device: Any,
           reporter: Reporter) -> MoEResult:
    from ..engine.moe import build_moe  # start-up time (torch): the CLI builds --help from this module

    start = time.perf_counter()
    with building(out, ROLE) as tmp:
        built = build_moe(tmp, config, sources, seed, device, SHARD_BYTES, reporter)
        result = MoEResult(out, built.output, len(config.experts), len(config.shared_experts),
                           config.experts_per_token, config.gate_mode, built.tensors,
                           round(time.perf_counter() - start, 3), spec.key())
        (tmp / "mergekit_moe_config.yml").write_bytes(config.path.read_bytes())  # as mergekit-moe keeps it
        files = {p.name: file_record(p) for p in sorted(tmp.iterdir()) if p.is_file() and p.name != OWNER_MARKER}
        (tmp / STAMP).write_text(json.dumps({"mergecli": __version__, "kind": "merged-moe", "key": spec.key(),
                                             "files": files, "result": _stored(result)}, indent=1))
        publish(tmp, out, owned=ours)
    return result


def _stored(result: MoEResult) -> dict[str, Any]:
    data = result.as_dict()
    data.pop("path")
    data.pop("reused")
    return data


def show_moe(result: MoEResult) -> View:
    rows = [[str(result.path), result.architecture, result.experts + result.shared_experts, result.gate_mode,
             "yes" if result.reused else "no", f"{result.seconds:.1f} s"]]
    return View("mixture of experts", ["output", "architecture", "experts", "gates", "reused", "time"], rows,
                result.as_dict())
