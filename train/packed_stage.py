"""A packed stage's layout (pipelines.pack's output, read through unicap.contract.packed): its file list,
bucket table and bucket runs (one per file x bucket: the pack sorts each file's ok rows by bucket), read once
at start-up; and `check_packed`, the fail-fast check that `data.packed` is a packed stage at all."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from train.packed_cache import RemoteFile
from unicap import storage
from unicap.contract import packed

log = logging.getLogger("train.data")  # its warnings belong to the data path: train.data's logger


def _file_runs(path: Path | str, filesystem=None) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(bucket, first row, rows) of each run of ok rows in one packed index; None if unreadable."""
    try:
        table = pq.read_table(path, columns=packed.RUN_COLUMNS, filesystem=filesystem)
        b = table.column("bucket").to_numpy()  # (n,) int16
    except (OSError, ValueError) as e:  # a missing or broken index: the file's rows are skipped
        log.warning("packed index %s unreadable (%s): its rows are skipped", path, e)
        return None
    step = np.diff(b.astype(np.int32))
    if np.any(step < 0):
        raise ValueError(f"{path}: rows are not sorted by bucket; re-pack the stage (unicap pack)")
    starts = np.flatnonzero(np.concatenate([[len(b) > 0], step != 0]))  # (runs,) first row of each run
    lengths = np.diff(np.append(starts, len(b)))
    keep = b[starts] >= 0  # failed rows (bucket -1) sort first and are no run
    return b[starts][keep].astype(np.int16), starts[keep].astype(np.int64), lengths[keep].astype(np.int64)


def _cat(arrays: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(arrays).astype(dtype, copy=False) if arrays else np.zeros(0, dtype)


class NotAPackedStage(FileNotFoundError, ValueError):
    """data.packed names a folder without `_pack.json` (a FileNotFoundError, and a ValueError: bad input)."""


class PackedStage:
    """A packed stage's layout: file list, bucket table, and its bucket runs (one per file x bucket).

    Reads `_pack.json` and each index's int16 `bucket` column once; keeps only the run table.
    `packdir` may be a URI: then `remote` maps each file name to its RemoteFile (size, mtime) from one listing,
    `file_bytes` gives each file id's bytes (tar + index), and batches are read through a PackedCache."""

    def __init__(self, packdir: str | Path, threads: int = 8):
        self.loc = storage.resolve(packdir)
        self.is_remote = not self.loc.is_local
        self.remote: dict[str, RemoteFile] = {}
        if self.is_remote:
            self.packdir: Path | str = self.loc.uri
            meta = self._remote_meta()
        else:
            self.packdir = Path(packdir)
            meta_path = self.packdir / packed.PACK_META
            if not meta_path.exists():
                raise NotAPackedStage(f"{self.packdir} is not a packed stage (no {packed.PACK_META}): unicap pack")
            meta = json.loads(meta_path.read_text())
        self.resolution: int = meta["resolution"]
        self.buckets: list[tuple[int, int]] = [tuple(b) for b in meta["buckets"]]
        self.levels: tuple[str, ...] = tuple(meta["levels"])
        self.languages: tuple[str, ...] = tuple(meta["languages"])
        self.complete: bool = meta.get("complete", False)
        self.files: list[str] = list(meta["shards"])  # file id = position here (fixed by the pack)
        with ThreadPoolExecutor(threads) as pool:  # Parquet reads release the GIL
            found = list(pool.map(self._runs, self.files))
        pa.default_memory_pool().release_unused()  # the read buffers: a rank keeps only the run table
        self.missing: list[str] = [s for s, r in zip(self.files, found, strict=True) if r is None]
        runs = [(i, r) for i, r in enumerate(found) if r is not None]
        self.run_file = _cat([np.full(len(r[0]), i, np.int32) for i, r in runs], np.int32)  # (R,) file id
        self.run_bucket = _cat([r[0] for _, r in runs], np.int16)  # (R,)
        self.run_start = _cat([r[1] for _, r in runs], np.int64)  # (R,) first row in the file
        self.run_length = _cat([r[2] for _, r in runs], np.int64)  # (R,) rows
        self.rows = int(self.run_length.sum())  # ok rows, the samples of one epoch
        if self.missing:
            log.warning(
                "packed stage %s: %d of %d files missing or unreadable, skipped: %s",
                self.packdir,
                len(self.missing),
                len(self.files),
                self.missing[:10],
            )
        if not self.complete:
            log.warning("packed stage %s is incomplete (the pack job has not finished)", self.packdir)

    def _remote_meta(self) -> dict:
        """One listing of the stage folder (every file's version) and _pack.json; one-line errors for a missing
        bucket, refused credentials (storage.check_readable) or a folder that is not a packed stage."""
        storage.check_readable(self.loc)
        selector = pafs.FileSelector(self.loc.path, recursive=False, allow_not_found=True)
        for info in self.loc.fs.get_file_info(selector):
            if info.type == pafs.FileType.File:
                name = info.path.rstrip("/").rsplit("/", 1)[-1]
                self.remote[name] = RemoteFile(name, int(info.size), int(info.mtime_ns or 0))
        if packed.PACK_META not in self.remote:
            raise NotAPackedStage(
                f"{self.loc.uri} is not a packed stage (no {packed.PACK_META}): unicap pack --output {self.loc.uri}"
            )
        return self.loc.join(packed.PACK_META).read_json()

    def _runs(self, shard: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        if not self.is_remote:
            path = packed.index_path(self.packdir, shard)
            return _file_runs(path) if path.exists() else None
        if packed.index_name(shard) not in self.remote:
            return None
        return _file_runs(self.loc.join(packed.index_name(shard)).path, filesystem=self.loc.fs)

    @functools.cached_property
    def file_bytes(self) -> np.ndarray:
        """(files,) int64 bytes of each file id's tar and index in the remote folder (0 where absent)."""
        sizes = [sum(self.remote[n].size for n in packed.shard_files(s) if n in self.remote) for s in self.files]
        return np.asarray(sizes, dtype=np.int64)

    @property
    def fingerprint(self) -> str:
        """Identity of the sample set (files, runs): equal fingerprints, equal orders for equal seeds."""
        h = hashlib.sha256(json.dumps([self.files, self.buckets]).encode())
        for a in (self.run_file, self.run_bucket, self.run_start, self.run_length):
            h.update(a.tobytes())
        return h.hexdigest()[:16]


def check_packed(packdir: str) -> None:
    """Fail fast, before any rank starts, when `data.packed` (a folder or a URI) is no packed stage: a one-line
    NotAPackedStage, or a StorageError for a missing bucket or credentials. Reads no index."""
    loc = storage.resolve(packdir or ".")
    if not loc.is_local:
        storage.check_readable(loc)
    if not packdir or not loc.join(packed.PACK_META).is_file():
        raise NotAPackedStage(f"data.packed {packdir!r} is not a packed stage (no {packed.PACK_META}): unicap pack")
