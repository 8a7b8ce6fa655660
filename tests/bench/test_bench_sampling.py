"""bench/bench_sampling.py at a tiny size: the whole measurement (calibration, table, Pareto front, checks, speed
legs, the chosen default) on fresh tiny weights, and the speed-only row gpu-check runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.train.test_model import randomised
from train.checkpoint import save_weights
from train.model import NextDiT_configs

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def bench(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "bench/bench_sampling.py", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_the_whole_bench_on_tiny_weights(tmp_path):
    folder = save_weights(tmp_path / "final", randomised(NextDiT_configs["NextDiT_tiny"]), "tiny", "tiny")
    out = tmp_path / "sampling.json"
    sizes = ["--solvers", "euler,dpm++2m", "--steps", "4,8", "--thresholds", "0,0.5", "--table-n", "2", "--n", "3"]
    r = bench("--weights", str(folder), *sizes, "--batch", "4", "--rounds", "2", "--languages", "en", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert (folder / "teacache.json").is_file()  # calibrated beside the weights
    assert len(res["table"]) == 1 + 2 * 2 * 2 and any(c["pareto"] for c in res["table"].values())
    ref = res["table"]["euler/50/0"]
    assert ref["rel_l2"] == 0.0 and ref["evaluations"] == 100
    d = res["default"]
    assert d["args"].startswith("--solver ") and d["evaluations"] <= 50 and d["speedup"] > 0
    assert set(d["adherence_delta"]) == {"background", "colour", "shape", "count", "position"}
    assert res["speed"]["reference"]["speedup"]["median"] == 1.0
    assert "| solver/steps/threshold |" in r.stdout


def test_the_speed_only_row(tmp_path):
    out = tmp_path / "speed.json"
    sizes = ["--model", "NextDiT_XS", "--size", "64", "--batch", "2", "--rounds", "1", "--ref-steps", "8"]
    r = bench("--speed-only", *sizes, "--default-steps", "4", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["evaluations_per_image"]["reference"] == 16 and res["evaluations_per_image"]["default, no cache"] == 8
    assert res["evaluations_per_image"]["default"] <= 8 and res["default"]["speedup"] > 0
