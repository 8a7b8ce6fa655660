"""At the scale it is for: what a per-shard job costs its driver, and what it asks of a bucket.

Legs (each in a fresh child process, interleaved, --rounds times; medians with their spread):
- driver: the driver process's own CPU seconds (getrusage, from the job's start to its end: Ray's workers are other
  processes) and peak RSS of the score job (tiny CLIP, the answer key's captions) at --rows-small and --rows-large
  rows, and of a job with a cheap stage (keys in, keys out) at --rows-cheap rows. Per row: the difference between
  the two sizes over the rows added. `--old REV` runs the same legs on another revision of the repository
  (`git archive REV`), the runner as it was: before / after in one run.
- requests: every S3 request of each job (synth, caption, score) on a real S3-compatible server (moto's server
  mode on a local port), counted by the server, for the same shards with few and with many rows each: a constant
  per shard, not per row.
- throughput: rows/s of the caption and score jobs with everything in the bucket against local folders.

    .venv/bin/python bench/bench_scale.py [--rounds 3] [--old 4414fc4]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(tempfile.gettempdir()) / "unicap-bench-scale"  # the driver legs' inputs, kept between runs
sys.path.insert(0, str(ROOT))
from bench._results import save, spread  # noqa: E402


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


def cheap_shards(out: Path, rows: int, shard_size: int) -> None:
    """ROWS items of one tiny PNG each, in shards of SHARD_SIZE (fast to write: the cheap leg measures the driver)."""
    from datagen.shards import ShardItem, shard_name, write_shard

    image = _png()
    for s in range(0, rows, shard_size):
        keys = [f"k{i:09d}" for i in range(s, min(rows, s + shard_size))]
        items = [ShardItem(key=k, source=k, image=image, ext="png", width=8, height=8) for k in keys]
        write_shard(out, shard_name(s // shard_size), items)


class KeyStage:
    """The cheapest stage: keys in, keys out."""

    def __call__(self, batch):
        return batch.select(["key", "shard"])


def cheap_job():
    import pyarrow as pa

    from pipelines.runner import ShardJob

    schema = pa.schema([("key", pa.string()), ("shard", pa.string())])
    rows = lambda t: {"rows": t.num_rows}  # noqa: E731
    empty = lambda f: schema.empty_table()  # noqa: E731
    return ShardJob(name="keys", stage_cls=KeyStage, stage_kwargs={}, schema=schema, stats_fn=rows, failure_table=empty)


def driver_leg(kind: str, rows: int, work: Path) -> dict:
    """(child) one job over ROWS rows; the driver's CPU seconds and peak RSS over the job."""
    from unicap.runtime import init_ray

    data, out = DATA / f"{kind}-{rows}", work / "out"  # the input is made once and shared by every round and tree
    if not (data / "done").exists():
        shutil.rmtree(data, ignore_errors=True)
        if kind == "score":
            from datagen.synth import synth

            synth(str(data), rows, seed=3, shard_size=1000)
        else:
            cheap_shards(data, rows, 1000)
        (data / "done").write_text("")
    init_ray(quiet=True)
    before = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.time()
    if kind == "score":
        from pipelines.score import ScoreConfig, run_job

        cfg = ScoreConfig(clip="tiny", batch_size=64, precision="fp32", dedup=False, concurrency=1)
        run_job(str(data), str(data / "truth"), str(out), cfg)
    else:
        from pipelines.runner import run_sharded

        run_sharded(cheap_job(), str(data), str(out), batch_size=1000)
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {
        "rows": rows,
        "driver_cpu_s": round(cpu, 3),
        "wall_s": round(time.time() - t0, 2),
        "rss_mb": after.ru_maxrss // 1024,
    }


def requests_leg(work: Path) -> dict:
    """(child) S3 requests per job, 4 shards of 8 rows and 4 shards of 32 rows, counted by the server."""
    from datagen.synth import synth
    from pipelines.caption import run_job as caption
    from pipelines.score import ScoreConfig
    from pipelines.score import run_job as score
    from tests.s3_server import S3Server
    from unicap import storage
    from unicap.captioner import CaptionConfig
    from unicap.engines import EngineConfig
    from unicap.runtime import init_ray
    from unicap.tiny_vlm import tiny_qwen2vl

    server = S3Server()
    os.environ.update(server.env)
    storage.clear_filesystem_cache()
    model = str(tiny_qwen2vl())
    init_ray(quiet=True)
    result = {}
    for per_shard in (8, 32):
        bucket = f"bench-{per_shard}"
        server.client().create_bucket(Bucket=bucket)
        root, counts = f"s3://{bucket}", {}
        server.reset()
        synth(f"{root}/shards", 4 * per_shard, seed=1, shard_size=per_shard)
        counts["synth"] = server.requests()
        server.reset()
        engine = EngineConfig(model=model, max_pixels=112 * 112)
        tokens = {"long": 8, "medium": 8, "short": 8, "tags": 8}
        caption(
            f"{root}/shards", f"{root}/captions", engine, CaptionConfig(max_tokens=tokens, max_retries=0), batch_size=8
        )
        counts["caption"] = server.requests()
        server.reset()
        score(
            f"{root}/shards",
            f"{root}/captions",
            f"{root}/scores",
            ScoreConfig(clip="tiny", precision="fp32", dedup=False),
        )
        counts["score"] = server.requests()
        result[f"4 shards x {per_shard} rows"] = {
            job: {"total": sum(c.values()), **{f"{m} {k}": n for (m, k), n in sorted(c.items())}}
            for job, c in counts.items()
        }
    server.stop()
    return result


def throughput_leg(where: str, work: Path) -> dict:
    """(child) rows/s of the caption job (tiny VLM, 32 images) and the score job (tiny CLIP, 512 images), with every
    input and output in a local folder or in the bucket."""
    from datagen.synth import synth
    from pipelines.caption import run_job as caption
    from pipelines.score import ScoreConfig
    from pipelines.score import run_job as score
    from unicap.captioner import CaptionConfig
    from unicap.engines import EngineConfig
    from unicap.runtime import init_ray
    from unicap.tiny_vlm import tiny_qwen2vl

    server = None
    if where == "bucket":
        from tests.s3_server import S3Server
        from unicap import storage

        server = S3Server()
        os.environ.update(server.env)
        storage.clear_filesystem_cache()
        server.client().create_bucket(Bucket="bench")
        root = "s3://bench"
    else:
        root = str(work)
    model = str(tiny_qwen2vl())
    init_ray(quiet=True)
    synth(f"{root}/small", 32, seed=2, shard_size=8)
    synth(f"{root}/large", 512, seed=3, shard_size=128)
    engine = EngineConfig(model=model, max_pixels=112 * 112)
    tokens = {"long": 8, "medium": 8, "short": 8, "tags": 8}
    t0 = time.time()
    caption(f"{root}/small", f"{root}/captions", engine, CaptionConfig(max_tokens=tokens, max_retries=0), batch_size=8)
    caption_s = time.time() - t0
    t0 = time.time()
    score(
        f"{root}/large",
        f"{root}/large/truth",
        f"{root}/scores",
        ScoreConfig(clip="tiny", precision="fp32", dedup=False),
    )
    score_s = time.time() - t0
    if server:
        server.stop()
    return {"caption_rows_per_s": round(32 / caption_s, 2), "score_rows_per_s": round(512 / score_s, 2)}


def child(args: list[str], tree: Path) -> dict:
    """This script's --child leg in a fresh process, with the repository tree TREE first on the path."""
    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    env = {**os.environ, "PYTHONPATH": str(tree), "RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": "local"}
    cmd = [sys.executable, str(tree / "bench" / "bench_scale.py"), "--child", *args, "--work", str(work)]
    try:
        r = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"{' '.join(args)} failed:\n{r.stderr[-3000:]}")
        return json.loads(r.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(work, ignore_errors=True)


def old_tree(rev: str) -> Path:
    """The repository at REV (git archive), with this bench copied in, to run the same legs on the runner as it was."""
    tree = Path(tempfile.mkdtemp(prefix=f"bench-scale-{rev}-"))
    archive = subprocess.run(["git", "archive", rev], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    shutil.copy(__file__, tree / "bench" / "bench_scale.py")
    return tree


def per_row(small: dict, large: dict) -> float:
    return 1000 * (large["driver_cpu_s"] - small["driver_cpu_s"]) / (large["rows"] - small["rows"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rows-small", type=int, default=2000)
    ap.add_argument("--rows-large", type=int, default=20000)
    ap.add_argument("--rows-cheap", type=int, default=100000)
    ap.add_argument("--old", default=None, help="a git revision to measure the driver legs on too (before / after)")
    ap.add_argument("--skip", default="", help="comma-separated legs to skip: driver, requests, throughput")
    ap.add_argument("--out", default="bench/results/scale.json")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        leg, *rest = args.child
        legs = {"driver": lambda: driver_leg(rest[0], int(rest[1]), args.work)}
        legs |= {"requests": lambda: requests_leg(args.work), "throughput": lambda: throughput_leg(rest[0], args.work)}
        print(json.dumps(legs[leg]()))
        return 0

    skip = set(args.skip.split(","))
    trees = {"now": ROOT} | ({f"at {args.old}": old_tree(args.old)} if args.old else {})
    results: dict = {"machine": f"{os.cpu_count()} cores", "rounds": args.rounds}
    if "driver" not in skip:
        sizes = [("score", args.rows_small), ("score", args.rows_large), ("keys", args.rows_small)]
        sizes.append(("keys", args.rows_cheap))
        runs = {name: {f"{k} {n}": [] for k, n in sizes} for name in trees}
        for _ in range(args.rounds):  # interleaved: every tree and size once per round
            for kind, n in sizes:
                for name, tree in trees.items():
                    runs[name][f"{kind} {n}"].append(child(["driver", kind, str(n)], tree))
        driver = {}
        for name, legs in runs.items():

            def pairs(small: str, large: str, legs=legs):
                return zip(legs[small], legs[large], strict=True)

            med = {leg: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for leg, rs in legs.items()}
            score = pairs(f"score {args.rows_small}", f"score {args.rows_large}")
            cheap = list(pairs(f"keys {args.rows_small}", f"keys {args.rows_cheap}"))
            driver[name] = {
                "medians": med,
                "score_driver_ms_per_row": spread([per_row(a, b) for a, b in score], 4),
                "cheap_driver_ms_per_row": spread([per_row(a, b) for a, b in cheap], 4),
                "cheap_rss_growth_mb": spread([b["rss_mb"] - a["rss_mb"] for a, b in cheap], 1),
            }
        results["driver"] = driver
    if "requests" not in skip:
        results["requests"] = child(["requests"], ROOT)
    if "throughput" not in skip:
        # local and bucket on this tree, and local on the old tree (the runner as it was) when --old is given
        legs = {("local", "now"): [], ("bucket", "now"): []} | ({("local", "old"): []} if args.old else {})
        for _ in range(args.rounds):
            for where, tree in legs:
                legs[where, tree].append(
                    child(["throughput", where], trees[f"at {args.old}"] if tree == "old" else ROOT)
                )

        def ratio(num: tuple[str, str], den: tuple[str, str]) -> dict:
            pairs = list(zip(legs[den], legs[num], strict=True))
            return {k: spread([b[k] / a[k] for a, b in pairs]) for k in ("caption_rows_per_s", "score_rows_per_s")}

        medians = {f"{w} ({t})": {k: statistics.median(r[k] for r in rs) for k in rs[0]} for (w, t), rs in legs.items()}
        results["throughput"] = {"medians": medians, "bucket_over_local": ratio(("bucket", "now"), ("local", "now"))}
        if args.old:
            results["throughput"]["local_now_over_old"] = ratio(("local", "now"), ("local", "old"))
    save(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
