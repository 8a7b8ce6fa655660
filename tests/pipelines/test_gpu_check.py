"""make gpu-check, run here on CPU (--allow-cpu, 64 px) so that the check a GPU machine runs does not rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_on_cpu_runs_its_parts_and_writes_one_json(tmp_path):
    out = tmp_path / "gpu_check.json"
    cmd = [sys.executable, "-m", "pipelines.gpu_check", "--allow-cpu", "--resolution", "64", "--out", str(out),
           "--work", str(tmp_path / "work"), "--data", str(tmp_path / "data"),
           "--parts", "env,trainer,zero3,crash,sample,mfu,nothing"]  # fmt: skip
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert (
        r.returncode == 2 and "unknown part 'nothing'" in r.stderr
    )  # a typo is refused before anything runs
    cmd[-1] = "env,trainer,zero3,crash,sample,mfu"
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    res = json.loads(out.read_text())
    parts = ("env", "trainer", "zero3", "crash", "sample", "mfu")
    assert [res[p]["status"] for p in parts] == ["ok"] * 5 + ["skipped"], {p: res[p] for p in parts}
    t = res["trainer"]
    assert t["steps"] == 20 and t["final_weights"] and t["diffusers_export"] and t["sample_grid"]
    assert t["sigterm_checkpoint"] and t["resumed"]
    assert res["crash"]["exit_code"] != 0 and res["crash"]["seconds_to_exit"] < 10
    assert res["sample"]["images"] == 2
    for part in ("env", "trainer", "zero3", "crash", "sample", "mfu"):  # the table: one line per part
        assert any(line.startswith(part) for line in r.stdout.splitlines()), r.stdout
