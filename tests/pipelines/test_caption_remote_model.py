"""`unicap caption --model s3://...`: a captioner folder in a bucket (train-captioner's final/), downloaded into
the weights cache of each node whose actors load it, so that a Ray job on nodes that share only a bucket needs no
copy of the model on any disk beforehand. The captions equal those of the same job on the local folder. A model
URI that holds no complete captioner is one line and exit status 2, before Ray starts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest

from train.captioner import store
from train.captioner.export import PROVENANCE_FILE
from unicap import storage
from unicap.cli import main as unicap

pytest_plugins = ["tests.s3_server"]

REPO = Path(__file__).resolve().parents[2]
VOLATILE = ["model", "created_at"]  # the model column names the model as given: the URI, or the local folder


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from datagen.synth import synth

    out = tmp_path_factory.mktemp("synth")
    synth(str(out), 8, seed=5, shard_size=4)
    return out


def caption(model: str, shards: Path, out: Path, cache: Path) -> pd.DataFrame:
    """`python -m pipelines.caption` with its own embedded Ray, UNICAP_CACHE=cache (the node's caches); its
    captions sorted by key."""
    from train.captioner import tiny

    scratch = tempfile.mkdtemp(prefix="uc-")  # short: Ray's socket paths under TMPDIR must fit in 107 bytes
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "TMPDIR": scratch, "PYTHONPATH": str(REPO)}
    env.update(UNICAP_CACHE=str(cache))
    env.pop("RAY_ADDRESS", None)  # its own Ray, started in the environment that holds the bucket's AWS_* variables
    limits = ["--max-pixels", str(tiny.max_pixels()), "--max-retries", "0"]  # the resolution it was trained at
    cmd = [sys.executable, "-m", "pipelines.caption", "--input", str(shards), "--output", str(out)]
    try:
        r = subprocess.run([*cmd, "--model", model, *limits, "--batch-size", "4"], env=env, capture_output=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    assert r.returncode == 0, (r.stdout[-3000:] + r.stderr[-3000:]).decode(errors="replace")
    return pd.read_parquet(out).sort_values("key").reset_index(drop=True)


# slow: two caption jobs, each with an embedded Ray and a vLLM engine
@pytest.mark.slow
def test_a_captioner_in_a_bucket_captions_as_its_local_folder(s3, shards, tmp_path):
    from train.captioner import tiny

    local = tiny.tiny_captioner()  # the tiny captioner shipped in models/: real captions
    uri = f"{s3}/runs/captioner/final"
    store.upload(local, storage.resolve(uri), commit=PROVENANCE_FILE)  # as train-captioner publishes final/
    node = tmp_path / "node-cache"  # the caches of a node that never saw the model

    got = caption(uri, shards, tmp_path / "from-bucket", node)
    want = caption(str(local), shards, tmp_path / "from-folder", tmp_path / "cache")

    assert len(got) == 8 and (got.status == "ok").any()
    pd.testing.assert_frame_equal(got.drop(columns=VOLATILE), want.drop(columns=VOLATILE))
    assert set(got.model) == {uri} and set(want.model) == {str(local)}
    copies = list(node.glob("weights/*/final"))  # downloaded into the node's weights cache, once
    assert len(copies) == 1
    for f in local.iterdir():
        assert (copies[0] / f.name).read_bytes() == f.read_bytes(), f.name


def test_a_model_uri_without_a_complete_captioner_is_one_line(s3, shards, tmp_path, capsys):
    def refused(model: str, match: str) -> None:
        args = ["caption", "--input", str(shards), "--output", str(tmp_path / "out"), "--model", model]
        assert unicap(args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and match in err, err

    refused(f"{s3}/runs/nothing/final", f"--model {s3}/runs/nothing/final: no such file or folder")
    partial = storage.resolve(f"{s3}/runs/cut/final")
    partial.join("config.json").write_text("{}")  # an upload cut off before its commit file
    refused(partial.uri, f"--model {partial.uri} is not a complete captioner folder (no {PROVENANCE_FILE}")
    assert not (tmp_path / "out").exists()
