"""One real `ray job submit` against a `ray start --head` cluster started (and stopped) by the test."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import RayHead
from tests.pipelines.conftest import TINY_MAX_TOKENS_ARG

# slow: a Ray head and `ray job submit`: make test runs it, make test-fast does not
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.fixture
def ray_head():
    """`ray start --head` on 127.0.0.1 (tests.conftest.RayHead: its own session and temp dir, stopped by its own
    processes' ids, never `ray stop`)."""
    # as after `source .venv/bin/activate`: the job entrypoint `python` is the project venv's
    path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "PATH": path}
    head = RayHead(env)
    try:
        yield head.address, env
    finally:
        head.stop()


def test_caption_job_through_ray_job_submit(ray_head, tiny_vlm, synth_shards, tmp_path):
    address, env = ray_head
    out = tmp_path / "captions"
    submit = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO), "--"]
    job = ["--input", str(synth_shards), "--output", str(out), "--model", str(tiny_vlm), "--batch-size", "8"]
    limits = ["--max-retries", "0", "--max-pixels", str(112 * 112), "--max-tokens", TINY_MAX_TOKENS_ARG]
    cmd = [*submit, "python", "-m", "pipelines.caption", *job, *limits]
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
