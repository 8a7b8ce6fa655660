"""A cluster whose nodes share no disk: two Ray nodes (ray.cluster_utils.Cluster), every input and output in a bucket
on a real S3-compatible server (moto's server mode on a local port, started by tests/s3_server.py).

The jobs run as a user runs them (the command line, `--address` of the cluster, credentials in the environment),
from a working folder that must stay empty: nothing is written to the local disk outside temporary and cache
folders. Their outputs equal the same jobs' on local folders.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from tests.pipelines.conftest import TINY_MAX_TOKENS_ARG, kill_tree
from unicap import storage

pytest_plugins = ["tests.s3_server"]
# slow: a two-node Ray cluster and vLLM engines: make test runs it, make test-fast does not
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
CAPTION_LIMITS = ["--max-retries", "0", "--max-pixels", str(112 * 112), "--max-tokens", TINY_MAX_TOKENS_ARG]
VOLATILE = ("created_at",)  # the one column that differs between two runs of the same job


@pytest.fixture
def cluster(s3):
    """Two Ray nodes of one CPU each, started after the bucket's AWS_* variables are set (as on a cluster whose
    nodes get their credentials from their own environment)."""
    from ray.cluster_utils import Cluster

    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    nodes.add_node(num_cpus=1)
    nodes.wait_for_nodes()
    yield nodes
    nodes.shutdown()


def run_cli(args: list[str], workdir: Path, program: list[str] | None = None) -> subprocess.CompletedProcess:
    """`python -m MODULE ...` (or PROGRAM ARGS) from WORKDIR, with a temporary folder of its own (short: Ray's socket
    paths must fit in 107 bytes), removed afterwards."""
    tmp = tempfile.mkdtemp(prefix="uc-")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "TMPDIR": tmp, "PYTHONPATH": str(REPO)}
    try:
        cmd = [*(program or [sys.executable, "-m"]), *args]
        r = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def upload(local: Path, uri: str) -> None:
    dest = storage.resolve(uri)
    pafs.copy_files(str(local), dest.path, destination_filesystem=dest.fs)


def table(where) -> pa.Table:
    """The Parquet file at WHERE, or the Parquet files of the folder WHERE (not its tars), as one table by key."""
    loc = storage.resolve(where)
    t = pa.concat_tables([f.read_parquet() for f in loc.files(".parquet")]) if loc.is_dir() else loc.read_parquet()
    return t.drop_columns([c for c in VOLATILE if c in t.column_names]).sort_by("key")


@pytest.fixture(scope="module")
def captioner() -> list[str]:
    """The tiny captioner shipped in models/ at the resolution it was trained at: real captions, so that the
    pool's rows are ok and the stages are not empty."""
    from train.captioner import tiny

    return ["--model", str(tiny.tiny_captioner()), "--max-pixels", str(tiny.max_pixels())]


def flow(root: str, captioner: list[str], address: list[str]) -> list[list[str]]:
    """synth -> caption -> eval-captions -> score -> stages -> pack -> report, every path under ROOT (a folder or a
    URI)."""
    caption = [*captioner, "--batch-size", "4", *address]
    return [
        ["synth", "--out", f"{root}/shards", "--n", "24", "--seed", "5", "--shard-size", "4"],
        ["caption", "--input", f"{root}/shards", "--output", f"{root}/captions", "--concurrency", "2", *caption],
        ["eval-captions", "--captions", f"{root}/captions", "--truth", f"{root}/shards"],
        ["score", "--input", f"{root}/shards", "--captions", f"{root}/captions", "--output", f"{root}/scores"]
        + ["--clip", "tiny", "--no-near-dedup", "--concurrency", "2", *address],
        ["stages", "--scores", f"{root}/scores", "--output", f"{root}/stages", "--shards", f"{root}/shards"]
        + ["--stage1", "1.0", "--stage2", "0.5", "--stage3", "0.25"],
        ["pack", "--manifest", f"{root}/stages/stage1.parquet", "--captions", f"{root}/captions", "--shards"]
        + [f"{root}/shards"]
        + ["--output", f"{root}/packed/stage1", "--resolution", "64", "--concurrency", "2", *address],
        ["report", "--data", root, "--truth", f"{root}/shards", "--out", f"{root}/report.html"],
    ]


UNICAP = [str(Path(sys.executable).with_name("unicap"))]


def test_the_data_flow_on_a_bucket_across_two_nodes_equals_the_local_run(cluster, s3, captioner, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    for command in flow(s3, captioner, ["--address", cluster.address]):
        run_cli(command, work, UNICAP)
    assert os.listdir(work) == []  # nothing written to the local disk outside temporary and cache folders
    for command in flow(str(tmp_path / "local"), captioner, []):
        run_cli(command, tmp_path, UNICAP)

    bucket, local = storage.resolve(s3), tmp_path / "local"
    for folder in ("captions", "scores", "packed/stage1"):  # the same rows, captions, scores, packed images
        got, want = table(bucket.join(folder)), table(local / folder)
        assert got.num_rows > 0 and got.equals(want), folder
    names = bucket.join("captions").listdir()
    assert names == sorted([*(f"0000{i}.parquet" for i in range(6)), "_eval.json", "_stats", "_summary.json"])
    for stage in ("stage1", "stage2", "stage3"):
        got, want = table(bucket.join("stages", f"{stage}.parquet")), table(local / "stages" / f"{stage}.parquet")
        assert got.column("key").to_pylist() == want.column("key").to_pylist() and got.num_rows > 0, stage
    tars = {f.name: f.read_bytes() for f in bucket.join("packed", "stage1").files(".tar")}
    assert tars and tars == {p.name: p.read_bytes() for p in (local / "packed" / "stage1").glob("*.tar")}
    page = bucket.join("report.html").read_text()
    assert len(page) > 10_000 and page.count("data:image/") >= 1, "the page from the bucket lacks its images"
    evaluated = bucket.join("captions", "_eval.json").read_json()
    assert evaluated["rows"] == 24 == json.loads((local / "captions" / "_eval.json").read_text())["rows"]


def test_kill_9_mid_job_on_a_bucket_then_rerun_loses_nothing_and_writes_nothing_twice(
    s3, s3_server, tiny_vlm, tmp_path
):
    from datagen.synth import synth

    synth(str(tmp_path / "shards"), 24, seed=9, shard_size=3)  # 8 shards
    upload(tmp_path / "shards", f"{s3}/shards")
    out = storage.resolve(f"{s3}/captions")
    args = ["pipelines.caption", "--input", f"{s3}/shards", "--output", out.uri, "--model", str(tiny_vlm)]
    args += ["--batch-size", "3", *CAPTION_LIMITS]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    silent = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc = subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, env=env, start_new_session=True, **silent)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not out.files(".parquet"):
            assert proc.poll() is None, "the job ended before it wrote a shard"
            time.sleep(0.2)
    finally:
        kill_tree(proc.pid)  # kill -9, the driver and its whole embedded Ray
    before = {f.name: f.info().mtime for f in out.files(".parquet")}
    assert 1 <= len(before) < 8, before
    stats = {f.name.replace(".json", ".parquet") for f in out.join("_stats").files(".json")}
    unrepaired = len(set(before) - stats)  # killed between a shard's Parquet and its stats: the re-run repairs them
    s3_server.reset()
    run_cli(args, tmp_path)
    puts = sum(n for (method, _), n in s3_server.requests().items() if method in ("PUT", "POST"))
    after = {f.name: f.info().mtime for f in out.files(".parquet")}
    assert all(after[name] == mtime for name, mtime in before.items())  # written before the kill: untouched
    keys = table(out.uri).column("key").to_pylist()
    assert len(keys) == 24 == len(set(keys))  # 0 rows lost, 0 written twice
    # the re-run wrote only the missing shards (a Parquet and a stats file each), the stats the kill cut off, its
    # summary, and the write check's probe (one object, and the empty folder marker pyarrow leaves when deleting it)
    assert puts <= 2 * (8 - len(before)) + unrepaired + 3, (puts, s3_server.requests())
