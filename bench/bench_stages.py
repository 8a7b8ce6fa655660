"""Stage selection at scale: wall time and peak memory on generated score tables of growing size.

    .venv/bin/python bench/bench_stages.py [--sizes 1M,5M,20M] [--workdir /tmp/unicap-bench-stages]

Each size runs in its own process (peak RSS of that process, DuckDB included), targets in the
paper's proportions (stage1 = all, stage2 = 10%, stage3 = 1%); the growth from the smallest size
is reported, so the 100M figure can be read off (or run with --sizes 100M where disk allows:
~1.1 GB of Parquet per 10M rows).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._results import run_child, save  # noqa: E402


def child(rows: int, workdir: Path) -> dict:
    from datagen.score_tables import write_score_table
    from pipelines.stages import select_stages

    src = workdir / f"scores_{rows}"
    t0 = time.time()
    write_score_table(src, rows)
    gen_s = time.time() - t0
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = workdir / f"stages_{rows}"
    shutil.rmtree(out, ignore_errors=True)  # else select_stages finds it up to date and does nothing
    t0 = time.time()
    f = select_stages(src, out, "1.0", "0.1", "0.1", threads=2)
    seconds = time.time() - t0
    return {
        "rows": rows,
        "seconds": seconds,
        "generate_seconds": gen_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_select_mb": rss_before / 1024,
        "selected": [f[s]["selected"] for s in ("stage1", "stage2", "stage3")],
    }


def main() -> int:
    from unicap.stage_rules import parse_count

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1M,5M,20M")
    ap.add_argument("--workdir", default="/tmp/unicap-bench-stages")
    ap.add_argument("--child", type=int)
    ap.add_argument("--out", default="bench/results/stages.json")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, Path(args.workdir))))
        return 0
    results = []
    for size in args.sizes.split(","):
        n = parse_count(size)
        results.append(run_child(__file__, "--child", str(n), "--workdir", args.workdir))
        print(results[-1], flush=True)
    base = results[0]
    for r in results:
        r["time_ratio_vs_smallest"] = r["seconds"] / base["seconds"]
        r["rows_ratio_vs_smallest"] = r["rows"] / base["rows"]
    save(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
