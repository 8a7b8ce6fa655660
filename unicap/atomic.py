"""Atomic, exactly-once file output: write under a hidden temporary name, rename when complete.

Readers (pandas.read_parquet(dir), pyarrow.dataset, datasets) ignore names starting with "." or
"_", so a half-written file is never seen, and a job killed mid-write leaves only a temporary
file that the next run removes. `os.replace` is atomic on POSIX within one file system.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

TMP_MARK = ".tmp-"
# the one name atomic_path gives a temporary: "." + final name + ".tmp-" + 8 hex digits
TEMPORARY = re.compile(r"^\.(?P<final>.+)\.tmp-[0-9a-f]{8}$", re.DOTALL)


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


def final_name(name: str) -> str | None:
    """The file a temporary of atomic_path stands for (".00001.parquet.tmp-1a2b3c4d" -> "00001.parquet"),
    or None when `name` is not such a temporary."""
    m = TEMPORARY.match(name)
    return m["final"] if m else None


def remove_stale_temporaries(
    directory: str | os.PathLike, names: Iterable[str] | Callable[[str], bool] | None = None
) -> int:
    """Delete temporaries left by a killed run; returns how many were removed.

    Only files named exactly as atomic_path names its temporaries are touched, and, when `names` is
    given (final paths relative to `directory`, or a predicate on them), only the temporaries of those
    files: a job removes what it would have written, never a user's file that happens to look alike."""
    directory = Path(directory)
    if names is not None and not callable(names):
        names = set(names).__contains__
    n = 0
    for p in directory.rglob(f".*{TMP_MARK}*"):
        final = final_name(p.name)
        if final is None or p.is_dir() and not p.is_symlink():
            continue
        rel = p.with_name(final).relative_to(directory).as_posix()
        if names is None or names(rel):
            p.unlink(missing_ok=True)
            n += 1
    return n
