"""`unicap validate DIR|FILE|URI...`: check caption Parquet against the caption record, summarise it.

Each path may be a local file or folder, or a URI (s3://bucket/captions, ...: unicap.storage)."""

from __future__ import annotations

import argparse
from collections import Counter

from unicap import storage
from unicap.contract import caption as caption_record
from unicap.storage import Location


def parquet_files(paths: list[str]) -> list[Location]:
    """Every visible .parquet file under the given files/folders, local or URIs (hidden "." and private "_"
    names excluded). A bucket that is missing or refuses the credentials is one StorageError line."""
    files: list[Location] = []
    for loc in map(storage.resolve, paths):
        if not loc.is_local:
            storage.check_readable(loc)
        if loc.is_dir():
            files += [f for f in loc.files(".parquet") if not f.name.startswith("_")]
        else:
            files.append(loc)
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
            table = f.read_parquet()
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
