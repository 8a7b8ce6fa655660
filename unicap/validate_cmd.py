"""`unicap validate DIR|FILE...`: check caption Parquet against the caption record, summarise it."""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

from unicap.atomic import visible_parquet_files
from unicap.contract import caption as caption_record


def parquet_files(paths: list[str]) -> list[Path]:
    """Every visible .parquet file under the given files/folders (hidden temporaries excluded)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += visible_parquet_files(p)
        else:
            files.append(p)
    return files


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", help="caption Parquet files or folders of them")


def run(args: argparse.Namespace) -> int:
    files = parquet_files(args.paths)
    if not files:
        print(f"validate: no Parquet files in {args.paths}")
        return 1
    bad, statuses, reasons, keys = 0, Counter(), Counter(), set()
    for f in files:
        try:
            table = pq.read_table(f)
            caption_record.validate(table)
        except (caption_record.SchemaError, OSError, ValueError) as e:
            bad += 1
            print(f"INVALID {f}: {e}")
            continue
        file_keys = set(table.column("key").to_pylist())
        if keys & file_keys:
            bad += 1
            print(f"INVALID {f}: keys also present in another file, e.g. {sorted(keys & file_keys)[:3]}")
        keys |= file_keys
        statuses.update(table.column("status").to_pylist())
        reasons.update(caption_record.error_reason(e) for e in table.column("error").to_pylist() if e)
    print(f"validate: {len(files) - bad}/{len(files)} files valid, {len(keys)} rows, status {dict(statuses)}")
    if reasons:
        print(f"  failures by reason: {dict(reasons.most_common())}")
    return 1 if bad else 0
