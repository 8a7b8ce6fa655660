"""Stage selection at scale: wall time and peak memory on generated score tables of growing size.

    .venv/bin/python bench/bench_stages.py [--sizes 1M,5M,20M] [--workdir /tmp/unicap-bench-stages]
    .venv/bin/python bench/bench_stages.py --sizes 1M,100M    # the 100M leg, with its 1M baseline

Each size is generated once under WORKDIR/scores_ROWS (files already there are reused: 100M takes
minutes to generate, ~2.2 GB of Parquet) by a process of its own, then selected in a fresh process, so
the peak RSS reported is the selection's (DuckDB and Python together), not the generator's. Targets in
the paper's proportions (stage1 = all, stage2 = 10%, stage3 = 1%); the growth from the first size is
reported: time_ratio_vs_smallest against rows_ratio_vs_smallest (linear: equal). The manifests stay
under WORKDIR/stages_ROWS for a look afterwards.
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


def scores_dir(rows: int, workdir: Path) -> Path:
    return workdir / f"scores_{rows}"


def generate(rows: int, workdir: Path) -> dict:
    """The score table of `rows` rows; the files already written (a previous run) are kept."""
    from datagen.score_tables import write_score_table

    src = scores_dir(rows, workdir)
    present = len(list(src.glob("*.parquet"))) if src.exists() else 0
    t0 = time.time()
    files = write_score_table(src, rows)
    return {"generate_seconds": time.time() - t0, "files_reused": min(present, len(files)), "files": len(files)}


def select(rows: int, workdir: Path, threads: int) -> dict:
    from pipelines.stages import select_stages

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = workdir / f"stages_{rows}"
    shutil.rmtree(out, ignore_errors=True)  # else select_stages finds it up to date and does nothing
    t0 = time.time()
    f = select_stages(scores_dir(rows, workdir), out, "1.0", "0.1", "0.1", threads=threads)
    seconds = time.time() - t0
    return {
        "rows": rows,
        "seconds": seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_select_mb": rss_before / 1024,
        "threads": threads,
        "selected": [f[s]["selected"] for s in ("stage1", "stage2", "stage3")],
    }


def main() -> int:
    from unicap.stage_rules import parse_count

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1M,5M,20M", help="comma-separated row counts; the first is the baseline")
    ap.add_argument("--workdir", default="/tmp/unicap-bench-stages")
    ap.add_argument("--threads", type=int, default=2, help="DuckDB threads")
    ap.add_argument("--out", default="bench/results/stages.json", help="where the results JSON goes")
    ap.add_argument("--generate", type=int, help=argparse.SUPPRESS)  # child: write the score table
    ap.add_argument("--select", type=int, help=argparse.SUPPRESS)  # child: run the selection
    args = ap.parse_args()
    workdir = Path(args.workdir)
    if args.generate:
        print(json.dumps(generate(args.generate, workdir)))
        return 0
    if args.select:
        print(json.dumps(select(args.select, workdir, args.threads)))
        return 0
    results = []
    for size in args.sizes.split(","):
        n = str(parse_count(size))
        gen = run_child(__file__, "--generate", n, "--workdir", args.workdir)
        results.append(run_child(__file__, "--select", n, "--workdir", args.workdir, "--threads", str(args.threads)))
        results[-1].update(gen)
        print(results[-1], flush=True)
    base = results[0]
    for r in results:
        r["time_ratio_vs_smallest"] = r["seconds"] / base["seconds"]
        r["rows_ratio_vs_smallest"] = r["rows"] / base["rows"]
    save(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
