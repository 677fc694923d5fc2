"""The write of a chosen merge from its stored parts, alone (issue #25): time and memory.

    python benchmarks/bench_scale_write.py /work/scale/7b-4/recipe.yaml regmean-learned

A `lambda: learned` (or `auto`) merge ends by writing base + sum_i s_i * part_i from the parts in
the workspace (`engine.parts`). At 7B widths the whole merge takes hours (its passes), so this
measures its last step on its own: on a `bench_scale.py` workspace whose parts for the merge
exist, it writes the merge with every scale 1 (the cost does not depend on the values: every
part is read once per tensor) into a fresh temporary folder (the system's), removed afterwards;
nothing of the recipe's outputs is touched. Wall time, VmHWM and RssAnon sampled every 50 ms, as
`bench_scale.run` reports them. It calls the merge stage's own planning and writing steps (private functions) because no command
writes a chosen merge without choosing it first.
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_scale import watch_anon  # noqa: E402 - beside this script


def main() -> None:
    from mergecli.app.api import Context, load_recipe
    from mergecli.quality.scales import Choice
    from mergecli.stages import merge, taskvec

    anon = watch_anon()
    path, name = Path(sys.argv[1]), sys.argv[2]
    ctx = Context(load_recipe(path))
    variant = merge.variant_of(ctx.recipe, ctx.recipe.merge(name))
    spec = merge.parts_spec(ctx, variant)
    if spec is None:
        raise SystemExit(f"{name}: its lambda is not chosen over parts")
    artifact = ctx.workspace.find(spec)
    if artifact is None:
        raise SystemExit(f"{ctx.recipe.workspace_path}: no parts for {name}; run its merge (bench_scale.py) first")
    folder = artifact.path
    vectors = {c.vector.model: c.vector for c in ctx.need(taskvec.STAGE)}
    start = time.perf_counter()
    plan = merge._plan(ctx, variant, [vectors[m.name] for m in variant.models], None, Choice(lam=1.0, scales={}),
                       folder)
    with tempfile.TemporaryDirectory(prefix="mergecli-write-bench-") as out:  # a fresh folder of its own
        written, _ = merge._write(ctx, variant, plan, Path(out), workers=2)
        seconds = time.perf_counter() - start
    hwm = int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1))
    print(json.dumps({"merge": name, "tensors": written.tensors, "kept_density": round(written.kept_density, 4),
                      "seconds": round(seconds, 1), "peak_rss_gib": round(hwm / 2**20, 3),
                      "peak_anon_gib": round(anon[0] / 2**20, 3)}))


if __name__ == "__main__":
    main()
