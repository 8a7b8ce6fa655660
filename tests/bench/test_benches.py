"""Smoke runs of the benches `make gpu-check` calls, at tiny CPU sizes: they must keep running, and fail fast.

bench/bench_trainer.py's whole run is in tests/pipelines/test_gpu_check.py (the step part, on a bare Python).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def test_bench_nextdit_at_a_tiny_size(tmp_path):
    out = tmp_path / "nextdit.json"
    sizes = ["--config", "NextDiT_XS", "--batch", "2", "--latent", "8", "--iters", "1"]
    cmd = [sys.executable, "bench/bench_nextdit.py", *sizes, "--out", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["ours"]["seconds_fwd_bwd"] > 0 and res["diffusers"]["seconds_fwd_bwd"] > 0
    assert res["ours"]["peak_rss_mb"] > 0


def test_bench_trainer_fails_fast_and_leaves_no_process(tmp_path, check_data):
    """A failing rank ends the bench at once with a non-zero code (bc670f1's rank stayed alive for minutes,
    holding a fixed port), and two benches at once do not collide on a port."""
    cmd = [sys.executable, "bench/bench_trainer.py", "--micro", "100000", "--steps", "1", "--resolution", "64"]
    cmd += ["--set", "model.text_encoder=tiny", "--packed", str(check_data / "packed")]
    t0 = time.time()
    quiet = {"cwd": ROOT, "stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE, "text": True}
    runs = [subprocess.Popen([*cmd, "--out", str(tmp_path / f"{i}.json")], **quiet) for i in range(2)]
    for run in runs:
        err = run.communicate(timeout=300)[1]
        assert run.returncode != 0 and "fills --micro 100000" in err, err[-2000:]
        assert "EADDRINUSE" not in err and "address already in use" not in err
    assert time.time() - t0 < 120
    leftovers = [p for p in psutil.process_iter(["cmdline"]) if "bench_trainer.py" in " ".join(p.info["cmdline"] or [])]
    assert not leftovers, [p.info["cmdline"] for p in leftovers]
