"""Near + exact dedup of a score folder at pool scale: time, peak memory, recall.

Synthetic pools written as the score job writes them ({shard}.parquet + _embeddings/{shard}.parquet,
float16 embeddings), with 1% planted near copies (the original plus noise, cosine ~0.99) and 0.1%
exact copies (same sha256). The dedup of each size runs in a fresh process (not the one that made
the pool), so its peak RSS is its own.

    .venv/bin/python bench/bench_dedup.py [--sizes 100k,1M] [--dim 512]

Reports, per size: seconds of find_duplicates against seconds of one plain pass reading the
embeddings into numpy (the floor any method pays, measured in the same process), peak RSS and peak
anonymous memory against the embeddings' size in float16 (what an in-memory method holds at
least), and the recall of the planted copies and the count of anything else flagged.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._results import run_child, save  # noqa: E402

SHARD = 20_000


def parse_size(s: str) -> int:
    s = s.strip().upper()
    mult = {"K": 1_000, "M": 1_000_000}.get(s[-1], 1)
    return int(float(s.rstrip("KM")) * mult)


def write_pool(root: Path, n: int, dim: int, seed: int = 0) -> dict:
    """n rows; the last 1.1% are copies of random earlier rows: 1% near (plus noise), 0.1% exact
    (same sha256). Returns what was planted."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    n_near, n_exact = n // 100, n // 1000
    first_copy = n - n_near - n_exact
    emb = rng.standard_normal((n, dim), dtype=np.float32).astype(np.float16)
    sha = np.array([f"{r:x}" for r in range(n)], dtype=object)
    src = rng.choice(first_copy, n_near + n_exact, replace=False)
    near, exact = np.arange(first_copy, first_copy + n_near), np.arange(first_copy + n_near, n)
    emb[near] = emb[src[:n_near]] + 0.1 * rng.standard_normal((n_near, dim), dtype=np.float32)
    emb[exact], sha[exact] = emb[src[n_near:]], sha[src[n_near:]]
    (root / "_embeddings").mkdir(parents=True)
    for s in range(0, n, SHARD):
        rows = np.arange(s, min(n, s + SHARD))
        keys = [f"{r:09d}" for r in rows]
        offsets = pa.array(np.arange(len(rows) + 1, dtype=np.int32) * dim)
        lists = pa.ListArray.from_arrays(offsets, pa.array(emb[rows].ravel()))
        name = f"{s // SHARD:05d}.parquet"
        pq.write_table(pa.table({"key": keys, "embedding": lists}), root / "_embeddings" / name)
        min_side, decode_error = np.full(len(rows), 512, np.int32), pa.nulls(len(rows), pa.string())
        scores = {"key": keys, "sha256": list(sha[rows]), "min_side": min_side, "decode_error": decode_error}
        pq.write_table(pa.table(scores), root / name)
    return {"near_planted": n_near, "exact_planted": n_exact, "first_copy": first_copy}


class AnonPeak:
    """Peak anonymous resident memory (RssAnon), sampled every 20 ms: RSS also counts the memmapped
    files' page cache, which the kernel can drop; anonymous memory is what must fit in RAM."""

    def __init__(self):
        import threading

        self.peak_mb, self._done = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._done.wait(0.02):
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    self.peak_mb = max(self.peak_mb, int(line.split()[1]) / 1024)

    def stop(self):
        self._done.set()
        self._thread.join()


def child(root: Path) -> dict:
    """find_duplicates on a pool folder, alone in this process (its peak RSS is the dedup's)."""
    import numpy as np
    import pyarrow.parquet as pq

    from unicap.dedup import find_duplicates

    planted = json.loads((root / "_planted.json").read_text())
    t0 = time.perf_counter()
    for f in sorted((root / "_embeddings").glob("*.parquet")):  # the floor: one pass into numpy
        col = pq.read_table(f).column("embedding").combine_chunks()
        np.asarray(col.flatten().to_numpy(zero_copy_only=False), np.float32).sum()
    read_s = time.perf_counter() - t0
    rss_read = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    anon = AnonPeak()
    t0 = time.perf_counter()
    dups = find_duplicates(root, 0.95).to_pandas()
    dedup_s = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    anon.stop()
    copies = dups[dups.key.astype(int) >= planted["first_copy"]]
    near = copies[copies.kind == "near"]
    exact = copies[copies.kind == "exact"]
    return {
        "read_seconds": read_s,
        "dedup_seconds": dedup_s,
        "dedup_over_read": dedup_s / read_s,
        "peak_rss_mb": peak / 1024,
        "rss_after_read_pass_mb": rss_read / 1024,
        "peak_anon_mb": anon.peak_mb,
        "near_recall": len(near) / max(planted["near_planted"], 1),
        "exact_recall": len(exact) / max(planted["exact_planted"], 1),
        "other_flagged": int(len(dups) - len(near) - len(exact)),
        **planted,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100k,1M")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--make", nargs=2, metavar=("N", "DIR"), help="(internal) write a pool")
    ap.add_argument("--child", default=None, help="(internal) dedup a pool folder")
    ap.add_argument("--out", default="bench/results/dedup.json")
    args = ap.parse_args()
    if args.make:
        planted = write_pool(Path(args.make[1]), int(args.make[0]), args.dim)
        (Path(args.make[1]) / "_planted.json").write_text(json.dumps(planted))
        return 0
    if args.child:
        print(json.dumps(child(Path(args.child))))
        return 0
    res = {"dim": args.dim, "runs": []}
    for size in args.sizes.split(","):
        n, root = parse_size(size), Path(tempfile.mkdtemp(prefix="bench-dedup-")) / "scores"
        try:
            dim = ["--dim", str(args.dim)]
            subprocess.run([sys.executable, __file__, *dim, "--make", str(n), str(root)], check=True)
            measured = run_child(__file__, *dim, "--child", str(root))
        finally:
            shutil.rmtree(root.parent, ignore_errors=True)
        run = {"rows": n, "embeddings_fp16_mb": n * args.dim * 2 / 2**20, **measured}
        run["peak_rss_over_embeddings"] = run["peak_rss_mb"] / run["embeddings_fp16_mb"]
        run["peak_anon_over_embeddings"] = run["peak_anon_mb"] / run["embeddings_fp16_mb"]
        res["runs"].append(run)
        print(json.dumps(run), flush=True)
    save(res, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
