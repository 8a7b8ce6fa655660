"""One real `ray job submit` against a `ray start --head` cluster started (and stopped) by the test."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest

from tests.conftest import free_port
from tests.pipelines.conftest import TINY_MAX_TOKENS, kill_all

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.fixture
def ray_head():
    """`ray start --head` on 127.0.0.1 with its own temp dir; stopped by killing its own processes
    (never `ray stop`, which would kill every Ray on the machine)."""
    temp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's unix socket paths are length-limited
    dash, gcs = free_port(), free_port()
    # every agent on its own free port: another Ray on this machine (the suite's embedded one) holds the defaults
    agent_ports = [f"--{name}={free_port()}" for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                   "metrics-export-port", "runtime-env-agent-port", "node-manager-port", "object-manager-port",
                   "ray-client-server-port")]  # fmt: skip
    # as after `source .venv/bin/activate`: the job entrypoint `python` is the project venv's
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}  # fmt: skip
    cmd = [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=4", f"--temp-dir={temp}",
           "--disable-usage-stats", "--include-dashboard=true", *agent_ports]  # fmt: skip
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=120)
    try:
        yield f"http://127.0.0.1:{dash}", env
    finally:
        procs = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                if any(temp in part for part in (p.info["cmdline"] or [])):
                    procs.append(p)
            except psutil.Error:
                pass
        kill_all(procs)
        shutil.rmtree(temp, ignore_errors=True)


def test_caption_job_through_ray_job_submit(ray_head, tiny_vlm, synth_shards, tmp_path):
    address, env = ray_head
    out = tmp_path / "captions"
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
           "python", "-m", "pipelines.caption", "--input", str(synth_shards), "--output", str(out),
           "--model", str(tiny_vlm), "--batch-size", "8", "--max-retries", "0", "--max-pixels", str(112 * 112),
           "--max-tokens", ",".join(f"{k}={v}" for k, v in TINY_MAX_TOKENS.items())]  # fmt: skip
    t0 = time.time()
    for _ in range(15):  # the head's job agent comes up a few seconds after `ray start` returns
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if "No available agent to submit job" not in r.stderr + r.stdout:
            break
        time.sleep(2)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "succeeded" in r.stdout.lower(), r.stdout[-2000:]
    assert "open with: pandas.read_parquet" in r.stdout
    df = pd.read_parquet(out)
    assert sorted(df.key) == sorted(pd.read_parquet(synth_shards / "truth").key) and df.key.is_unique
    print(f"ray job submit round trip: {time.time() - t0:.1f}s")
