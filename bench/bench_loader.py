"""The trainer's loader (train.data): samples/s, and start-up time and memory at stage scale.

    .venv/bin/python bench/bench_loader.py [--images 1024] [--index-rows 10M] [--workdir /tmp/unicap-bench-loader]

(a) throughput: a synthetic stage packed at 256 px by the real pack job (Ray), read through
    make_loader (DataLoader, 2 workers, micro-batch 4) for a few epochs: samples/s of the loader alone,
    to compare with the trainer's consumption at the CPU config (goal: loader >= 3x the trainer).
    Synthetic images are flat illustrations that decode fast; a second stage of noise textures
    (the JPEG worst case, ~3x the bytes) gives the conservative figure.
(b) scale: a packed index of --index-rows rows (1,000 files x 10k rows; index Parquet only, no
    images) -> PackedStage start-up time, the epoch plan's build time, RSS per row (peak and steady),
    and drawing 10k global batches of one rank. Runs in a fresh process, so its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import _data  # noqa: E402
from bench._results import run_child, save  # noqa: E402

ROWS_PER_FILE = 10_000


def packed_synth_stage(workdir: Path, images: int) -> Path:
    """The synthetic data set (datagen.synth), a manifest of all of it, packed at 256 px (Ray job)."""
    data, out = workdir / f"synth_{images}", workdir / f"packed_synth_{images}"
    return _data.packed_synth_stage(data, out, images, seed=11, shard_size=256, batch_size=32, concurrency=2)


def packed_texture_stage(workdir: Path, images: int) -> Path:
    """Noise textures (smoothed noise: JPEG's worst case) in the stage's buckets, written with the pack writer."""
    import numpy as np
    import pyarrow as pa
    from PIL import Image, ImageFilter

    from pipelines.pack import row_schema, write_packed_shard
    from train.buckets import bucket_table
    from unicap.atomic import write_json
    from unicap.contract import caption as caption_record
    from unicap.contract import packed

    out = workdir / f"packed_texture_{images}"
    if (out / packed.PACK_META).exists():
        return out
    levels, languages = caption_record.LEVELS, caption_record.LANGUAGES
    table, rng = bucket_table(256), np.random.default_rng(0)
    shards = [f"{i:05d}" for i in range(-(-images // 256))]
    for s, shard in enumerate(shards):
        rows = []
        for i in range(s * 256, min(images, (s + 1) * 256)):
            b = int(rng.choice([3, 6, 6, 6, 9]))
            w, h = table[b]
            im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).filter(ImageFilter.GaussianBlur(1))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=95)
            text = {c: f"{c} of texture {i}" for c in caption_record.caption_columns(levels, languages)}
            row = {"key": f"t{i:06d}", "shard": shard, "bucket": b, "width": w, "height": h, "status": "ok"}
            rows.append({**row, **text, "image": buf.getvalue()})
        write_packed_shard(out, shard, pa.Table.from_pylist(rows, schema=row_schema(levels, languages)))
    write_json(_data.pack_meta(table, levels, languages, shards), out / packed.PACK_META)
    return out


def loader_rate(packdir: Path, workers: int, micro_batch: int, epochs: int) -> dict:
    from train.batch_plan import BatchPlanner
    from train.config import DataConfig
    from train.data import make_loader
    from train.packed_stage import PackedStage
    from unicap.contract import packed

    cfg = DataConfig(packed=str(packdir), resolution=256, micro_batch=micro_batch, num_workers=workers)
    n = BatchPlanner(PackedStage(packdir), micro_batch, 0).batches_per_epoch * epochs
    it = iter(make_loader(cfg, seed=0, rank=0, world_size=1, start=0))
    for _ in range(2 * max(workers, 1)):  # workers started, first batches in flight
        next(it)
    t0, samples = time.time(), 0
    for _ in range(n):
        samples += len(next(it)["keys"])
    wall = time.time() - t0
    sizes = packed.read_index(packdir, columns=["size"]).column("size").to_pylist()
    jpeg_sizes = [s for s in sizes if s]  # failed rows have no image
    mean_jpeg_kb = sum(jpeg_sizes) / max(1, len(jpeg_sizes)) / 1024
    return {
        "stage": packdir.name,
        "workers": workers,
        "micro_batch": micro_batch,
        "batches": n,
        "samples": samples,
        "seconds": round(wall, 2),
        "samples_per_s": round(samples / wall, 1),
        "mean_jpeg_kb": round(mean_jpeg_kb, 1),
    }


# ---------------------------------------------------------------- (b) a 10M-row index


def write_index_only_stage(out: Path, rows: int) -> Path:
    """Packed index files (no tars) in the contract's schema: sorted buckets, positions, short captions."""
    import numpy as np
    import pyarrow as pa

    from train.buckets import assign_bucket, bucket_table
    from unicap.atomic import write_json, write_parquet
    from unicap.contract import caption as caption_record
    from unicap.contract import packed

    levels, languages = caption_record.LEVELS, caption_record.LANGUAGES
    schema, table = packed.packed_schema(levels, languages), bucket_table(256)
    files = -(-rows // ROWS_PER_FILE)
    shards = [f"{i:05d}" for i in range(files)]
    for f, shard in enumerate(shards):
        path = packed.index_path(out, shard)
        if path.exists():
            continue
        n = min(ROWS_PER_FILE, rows - f * ROWS_PER_FILE)
        rng = np.random.default_rng(f)
        aspect = np.exp(rng.normal(0, 0.35, n))
        bucket = np.sort(assign_bucket(aspect * 1000, np.full(n, 1000), table))
        bucket[rng.random(n) < 0.01] = packed.FAILED_BUCKET
        bucket.sort()
        ok = bucket >= 0
        size = np.where(ok, rng.integers(15_000, 40_000, n), 0)
        offset = np.cumsum(size + 2048) - size
        keys = np.char.add(f"k{shard}_", np.arange(n).astype(str))
        cols = {
            "key": keys,
            "shard": np.full(n, shard),
            "bucket": bucket.astype(np.int16),
            "width": np.array([table[b][0] if b >= 0 else 0 for b in bucket], np.int32),
            "height": np.array([table[b][1] if b >= 0 else 0 for b in bucket], np.int32),
            "offset": offset.astype(np.int64),
            "size": size.astype(np.int32),
            "json_offset": (offset + size + 512).astype(np.int64),
            "json_size": np.full(n, 900, np.int32),
            "status": np.where(ok, "ok", "failed"),
            "error": np.where(ok, None, "undecodable_image: synthetic"),
        }
        for c in packed.text_columns(levels, languages):
            cols[c] = np.full(n, f"a {c} caption of about this length, repeated")
        write_parquet(pa.table(cols, schema=schema), path)
    write_json(_data.pack_meta(table, levels, languages, shards), out / packed.PACK_META)
    return out


def peak_rss() -> int:
    """This process's peak RSS in bytes: VmHWM (ru_maxrss survives exec: it would report the parent's peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def scale_child(packdir: Path, micro_batch: int) -> dict:
    import psutil

    from train.batch_plan import BatchPlanner, RankBatchSampler, batch_rows
    from train.packed_stage import PackedStage, _file_runs
    from unicap.contract import packed

    proc = psutil.Process()
    rss_import = proc.memory_info().rss
    _file_runs(packed.index_files(packdir)[0])  # Parquet's one-off cost (readers, codecs, allocator arenas)
    rss0 = proc.memory_info().rss
    t0 = time.time()
    stage = PackedStage(packdir)
    startup = time.time() - t0
    rss_stage = proc.memory_info().rss
    t0 = time.time()
    planner = BatchPlanner(stage, micro_batch, 0)
    planner.plan(0)
    plan_s = time.time() - t0
    rss_plan = proc.memory_info().rss
    start = max(0, planner.batches_per_epoch - 5000 * 8)  # rank 3 of 8, from 5,000 of its batches before epoch 1
    sampler = iter(RankBatchSampler(stage, micro_batch, 0, rank=3, world_size=8, start=start))
    t0 = time.time()
    refs = [next(sampler) for _ in range(10_000)]  # crosses into epoch 1: a second plan is built on the way
    sample_s = time.time() - t0
    t0 = time.time()
    rows = sum(len(batch_rows(r, 0)) for r in refs)
    rows_s = time.time() - t0
    peak = peak_rss()
    n = stage.rows

    def per_row(rss: int) -> float:  # bytes per index row above the RSS before the stage
        return round((rss - rss0) / n, 3)

    return {
        "rows": n,
        "files": len(stage.files),
        "runs": len(stage.run_file),
        "micro_batch": micro_batch,
        "batches_per_epoch": planner.batches_per_epoch,
        "startup_s": round(startup, 2),
        "plan_build_s": round(plan_s, 3),
        "sample_10k_batches_s": round(sample_s, 3),
        "batch_rows_10k_batches_s": round(rows_s, 3),
        "rows_drawn": rows,
        "rss_before_mb": round(rss0 / 2**20, 1),
        "parquet_fixed_mb": round((rss0 - rss_import) / 2**20, 1),
        "stage_bytes_per_row": per_row(rss_stage),
        "stage_and_plan_bytes_per_row": per_row(rss_plan),
        "peak_bytes_per_row": per_row(peak),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--index-rows", default="10M")
    ap.add_argument("--workdir", default="/tmp/unicap-bench-loader")
    ap.add_argument("--only", choices=["rate", "scale"], default=None)
    ap.add_argument("--child-scale", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--micro-batch", type=int, default=4, help=argparse.SUPPRESS)
    ap.add_argument("--out", default="bench/results/loader.json")
    args = ap.parse_args()
    if args.child_scale:
        print(json.dumps(scale_child(Path(args.child_scale), args.micro_batch)))
        return 0
    from unicap.stage_rules import parse_count

    workdir = Path(args.workdir)
    results: dict = {}
    if args.only in (None, "rate"):
        stages = (packed_synth_stage(workdir, args.images), packed_texture_stage(workdir, args.images))
        results["throughput"] = [loader_rate(s, w, 4, args.epochs) for s in stages for w in (0, 2)]
    if args.only in (None, "scale"):
        rows = parse_count(args.index_rows)
        t0 = time.time()
        index_dir = write_index_only_stage(workdir / f"index_{rows}", rows)
        results["index_write_s"] = round(time.time() - t0, 1)
        results["scale"] = []
        for mb in (4, 1):
            results["scale"].append(run_child(__file__, "--child-scale", str(index_dir), "--micro-batch", str(mb)))
    save(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
