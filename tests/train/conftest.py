"""Fixtures of the trainer tests: a packed synthetic stage (packed by the real Ray job, or written without Ray by
the pack job's own writer) and a runner for real DeepSpeed ranks."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from PIL import Image

from pipelines.pack import row_schema, write_packed_shard
from tests.conftest import free_port
from train.buckets import bucket_table
from unicap import storage
from unicap.atomic import write_json
from unicap.contract import caption as caption_record
from unicap.contract import packed

PY = sys.executable
BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]
CPU_CONFIG = "train/configs/stage1_cpu.yaml"
# a small, fast run: 64 px, micro 2, global batch 4, no sample grids unless a test asks; the random tiny VAE (the
# trainer's mechanics do not depend on what it decodes; the trained one is tested in test_tiny_vae and the demo)
FAST = ["model.vae=tiny", "data.resolution=64", "data.micro_batch=2", "data.global_batch=4", "data.num_workers=0"]
FAST += ["run.sample_prompts=[]", "run.progress=false", "run.tensorboard=false", "run.save_every=1000"]
N_IMAGES = 24
# the stage write_stage writes (pipelines.pack's writer, no Ray)
LEVELS, LANGUAGES = caption_record.LEVELS, caption_record.LANGUAGES
ROWS = [30, 25, 0, 17, 9]  # per file; file 00002 has only failed rows
MB = 4


@pytest.fixture(scope="session")
def packed_stage(tmp_path_factory) -> Path:
    """24 synthetic images (3 shards), a manifest of all of them, packed at 64 px (real Ray job)."""
    import ray

    from datagen.shards import read_index
    from datagen.synth import synth
    from pipelines.pack import pack_stage

    root = tmp_path_factory.mktemp("stage")
    shards = root / "shards"
    synth(str(shards), N_IMAGES, seed=3, shard_size=8)
    index = read_index(shards)
    locations = [str(shards / f"{s}.tar") for s in index["shard"]]
    columns = {"key": index.key, "shard": index["shard"], "location": locations}
    manifest = pd.DataFrame({**columns, "width": index.width, "height": index.height})
    (root / "stages").mkdir()
    manifest.to_parquet(root / "stages" / "stage1.parquet")
    try:
        pack_stage(
            root / "stages" / "stage1.parquet", shards / "truth", root / "packed", shards_dir=shards, resolution=64
        )
    finally:
        ray.shutdown()
    corrupt_one_image(root / "packed")
    return root / "packed"


def corrupt_one_image(packed: Path) -> str:
    """Zero the bytes of the first ok image of the first packed shard (an undecodable sample at train time)."""
    import pyarrow.parquet as pq

    index = sorted(p for p in packed.glob("*.parquet") if not p.name.startswith(("_", ".")))[0]
    row = next(r for r in pq.read_table(index).to_pylist() if r["status"] == "ok")
    with open(index.with_suffix(".tar"), "r+b") as f:
        f.seek(row["offset"])
        f.write(b"\0" * row["size"])
    return row["key"]


def _jpeg(size: tuple[int, int], colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_stage(root, rows_per_file=ROWS, resolution=64, seed=0):
    """A packed stage of solid-colour images in 3 buckets, every caption "<column> <key>", and one
    failed row per file (which the loader must never serve)."""
    rng = np.random.default_rng(seed)
    table = bucket_table(resolution)
    buckets = [0, len(table) // 2, len(table) - 1]
    shards = [f"{i:05d}" for i in range(len(rows_per_file))]
    for shard, n in zip(shards, rows_per_file, strict=True):
        failed = {"key": f"f{shard}_failed", "shard": shard, "bucket": -1, "status": "failed"}
        rows = [{**failed, "error": "undecodable_image: synthetic"}]
        for i in range(n):
            key, b = f"f{shard}_{i:04d}", int(rng.choice(buckets))
            text = {c: f"{c} {key}" for c in caption_record.caption_columns(LEVELS, LANGUAGES)}
            colour = tuple(int(v) for v in rng.integers(0, 255, 3))
            ok = {"key": key, "shard": shard, "bucket": b, "width": table[b][0], "height": table[b][1], "status": "ok"}
            rows.append({**ok, **text, "original_caption": f"alt {key}", "image": _jpeg(table[b], colour)})
        shard_rows = pa.Table.from_pylist(rows, schema=row_schema(LEVELS, LANGUAGES))
        write_packed_shard(storage.resolve(root), shard, shard_rows)
    bucket_sizes = [list(b) for b in table]
    meta = {"version": packed.PACKED_VERSION, "resolution": resolution, "multiple": 16, "buckets": bucket_sizes}
    meta |= {"levels": list(LEVELS), "languages": list(LANGUAGES), "shards": shards, "complete": True}
    write_json(meta, root / packed.PACK_META)
    return root


def ok_keys(root) -> set[str]:
    t = packed.read_index(root, columns=["key", "status"]).to_pydict()
    return {k for k, s in zip(t["key"], t["status"], strict=True) if s == "ok"}


@pytest.fixture(scope="module")
def stage_dir(tmp_path_factory):
    return write_stage(tmp_path_factory.mktemp("packed"))


def env() -> dict:
    single_threaded = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT), **single_threaded}


def trainer_cmd(
    packed: Path,
    out: Path,
    overrides: list[str],
    *,
    nproc: int = 2,
    config: str = CPU_CONFIG,
    nnodes: int = 1,
    node_rank: int = 0,
    port: int | None = None,
) -> list[str]:
    ranks = ["--nnodes", str(nnodes), "--node_rank", str(node_rank), "--nproc_per_node", str(nproc)]
    rendezvous = ["--master_addr", "127.0.0.1", "--master_port", str(port or free_port())]
    trainer = ["-m", "train.trainer", "--config", config, f"data.packed={packed}", f"run.out={out}"]
    return [str(BIN / "torchrun"), *ranks, *rendezvous, *trainer, *FAST, *overrides]


def run_trainer(packed: Path, out: Path, overrides: list[str], timeout: int = 600, **kw) -> subprocess.CompletedProcess:
    cmd = trainer_cmd(packed, out, overrides, **kw)
    r = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-6000:])
    return r


def metrics(run_dir: Path) -> dict[int, dict]:
    """step -> the last metrics line logged for it (a resumed run may re-log steps after a hard kill)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        out[m["step"]] = m
    return out


def keys_seen(run_dir: Path) -> list[str]:
    keys = []
    for f in sorted((run_dir / "keys").glob("*.txt")):
        for line in f.read_text().splitlines():
            keys += line.split()
    return keys
