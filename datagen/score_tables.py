"""Synthetic score tables in the score job's schema (unicap.contract.scores), of any size: for the
stage-selection benchmark and tests. Written in files of `rows_per_file` rows, generated chunk by
chunk (bounded memory). English long/medium/short captions are scored, as the default stage rules read.

    python -m datagen.score_tables --out /tmp/scores20M --rows 20M
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow as pa

from unicap.atomic import write_parquet
from unicap.contract import scores
from unicap.stage_rules import parse_count

LEVELS, LANGUAGES = ("long", "medium", "short"), ("en",)
SCHEMA = scores.score_schema(LEVELS, LANGUAGES)


def score_chunk(start: int, n: int, seed: int = 0, dup_rate: float = 0.02, bad_rate: float = 0.03) -> pa.Table:
    rng = np.random.default_rng([seed, start])
    idx = np.arange(start, start + n)
    w = rng.choice([256, 512, 768, 1024, 1280, 2048], size=n, p=[0.3, 0.25, 0.15, 0.15, 0.1, 0.05])
    aspect = np.exp(rng.normal(0, 0.35, n)).clip(0.2, 6.0)
    h = np.maximum(32, (w / aspect).astype(np.int64))
    bad = rng.random(n)
    decode_error = np.where(bad < bad_rate / 2, "undecodable_image: truncated: synthetic", None)
    caption_status = np.where((bad >= bad_rate / 2) & (bad < bad_rate), "failed", "ok")
    keys = np.char.add("k", idx.astype(str))
    sha = np.char.add("h", idx.astype(str)).astype(object)
    dup = rng.random(n) < dup_rate  # an exact duplicate of the previous row's image
    sha[1:][dup[1:]] = sha[:-1][dup[1:]]
    clip = rng.normal(0.30, 0.05, n).astype(np.float32)
    col = scores.clip_column
    columns = {
        "key": keys,
        "shard": np.char.add("s", (idx // 10_000).astype(str)),
        "width": w.astype(np.int32),
        "height": h.astype(np.int32),
        "min_side": np.minimum(w, h).astype(np.int32),
        "aspect_ratio": (np.maximum(w, h) / np.minimum(w, h)).astype(np.float32),
        "sha256": sha.astype(str),
        "source": keys,
        "caption_status": caption_status,
        "caption_levels_ok": np.full(n, "long,medium,short,tags"),
        "decode_error": decode_error,
        col("long", "en"): clip,
        col("medium", "en"): clip + rng.normal(0, 0.01, n).astype(np.float32),
        col("short", "en"): clip + rng.normal(0, 0.01, n).astype(np.float32),
        "aesthetic": rng.normal(5.0, 1.0, n).astype(np.float32),
        "clip_model": np.full(n, "synthetic"),
    }
    return pa.table(columns, schema=SCHEMA)


def write_score_table(out: str | Path, rows: int, rows_per_file: int = 1_000_000, seed: int = 0) -> list[Path]:
    out = Path(out)
    paths = []
    for i, start in enumerate(range(0, rows, rows_per_file)):
        path = out / f"{i:05d}.parquet"
        if not path.exists():
            write_parquet(score_chunk(start, min(rows_per_file, rows - start), seed), path)
        paths.append(path)
    return paths


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--rows", default="1M")
    p.add_argument("--rows-per-file", type=int, default=1_000_000)
    args = p.parse_args()
    n = parse_count(args.rows)
    write_score_table(args.out, n, args.rows_per_file)
    print(f"{n} rows under {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
