"""Atomic, exactly-once file output: write under a hidden temporary name, rename when complete.

Readers (pandas.read_parquet(dir), pyarrow.dataset, datasets) ignore names starting with "." or
"_", so a half-written file is never seen, and a job killed mid-write leaves only a temporary
file that the next run removes. `os.replace` is atomic on POSIX within one file system.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

TMP_MARK = ".tmp-"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync and rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_parquet(table: pa.Table, path: str | os.PathLike, **kwargs) -> Path:
    """Write a Parquet file atomically (zstd by default); the schema metadata is kept."""
    kwargs.setdefault("compression", "zstd")
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, **kwargs)
    return Path(path)


def write_json(obj, path: str | os.PathLike) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    return Path(path)


def visible_parquet_files(directory: str | os.PathLike) -> list[Path]:
    """The Parquet files a reader of `directory` sees: hidden (".") and private ("_") names excluded."""
    return sorted(p for p in Path(directory).glob("*.parquet") if not p.name.startswith((".", "_")))


def remove_stale_temporaries(directory: str | os.PathLike) -> int:
    """Delete temporaries left by a killed run; returns how many were removed."""
    n = 0
    for p in Path(directory).rglob(f".*{TMP_MARK}*"):
        p.unlink(missing_ok=True)
        n += 1
    return n
