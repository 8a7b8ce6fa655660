"""A node-local cache of a remote packed stage's files (data.packed = "s3://..."), bounded, LRU, shared by
every rank and loader worker of a node (after MosaicML Streaming's remote= / local= / cache_limit).

    cache = PackedCache.open(cfg, stage)            # start-up: the bad-input checks, one line each
    path = cache.get(stage.loc, stage.remote["00001.tar"])   # local path of the file, fetched if needed
    cache.get(..., wait=False)                      # a prefetch: skip when another process is at it

Layout: CACHE_DIR/<stage name>-<hash of its URI>/<file>.<size>-<mtime_ns>. The file's remote version (size and
modification time, from the one listing PackedStage makes at start-up) is part of its name, so a file that is
cached and unchanged is found by name and never fetched again: not in the next epoch, not in the next run on
the node; a file re-packed under the same name gets another name and the old one ages out.

Sharing between processes (ranks and their DataLoader workers), without a daemon:
- a fetch writes `.<entry>.part-<host>-<pid>` (created with O_EXCL, sized to the file's full size at once) and
  renames it onto the entry: an entry that exists is complete;
- a part of a live process means "being fetched": another process that needs the same file waits for the
  rename instead of fetching it twice (a prefetch just moves on); a dead process's parts are deleted;
- every change of the folder's names happens under one flock on CACHE_DIR/.lock: a claim (evict the least recently
  used entries, then create the part), a publication (rename the part onto its entry), a failed or dead fetch's
  part deleted. So a claim's scan sees every byte the folder holds, and the cache folder (entries + parts at their
  full size) never holds more than the limit, whatever the number of processes. (A rename outside the lock once
  hid a file from a scan running beside it: the scan read the names, the part was renamed, its stat failed, the
  entry's name had not been read; one file uncounted, and the claim overfilled the cache by that file.)
LRU: every use of an entry sets its mtime to now; room is made by deleting the entries least recently used.
A process still reading an entry that another evicted keeps its open descriptor (POSIX unlink); one that
had not opened it yet gets FileNotFoundError and asks again (`get` re-fetches).

A cache smaller than the stage refetches what it evicted: the epoch order visits every file every epoch in a
random order, so below the stage's size each epoch fetches about (1 - limit / stage) of the stage again.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import math
import os
import re
import shutil
import socket
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from unicap.storage import Location
from unicap.storage_errors import first_line, with_retries

log = logging.getLogger(__name__)

GB = 10**9
CHUNK = 8 << 20  # bytes per read of a fetch
FETCH_ATTEMPTS = 3  # whole-file attempts on transient errors (each request is retried by the S3 client as well)
WAIT_S = 600.0  # longest wait for another process's fetch of the same file, or for room in the cache
POLL_S = 0.05
LOCK_NAME = ".lock"
_PART = re.compile(r"^\.(?P<entry>.+)\.part-(?P<host>[^-]+)-(?P<pid>\d+)$")


class RemoteFile(NamedTuple):
    """A file of the remote stage as listed at start-up: its name in the stage folder and its version."""

    name: str
    size: int
    mtime_ns: int

    @property
    def entry(self) -> str:
        """The name of its cache entry: the version is part of it."""
        return f"{self.name}.{self.size}-{self.mtime_ns}"


class FetchError(OSError):
    """A file that could not be fetched into the cache (after retries): its samples are skipped and counted."""


def default_cache_dir() -> Path:
    """$UNICAP_CACHE/packed, else ~/.cache/unicap/packed."""
    base = os.environ.get("UNICAP_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "unicap") / "packed"


def stage_folder_name(uri: str) -> str:
    """The cache sub-folder of one remote stage: readable, and distinct for distinct URIs."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", uri.rstrip("/").rsplit("/", 1)[-1])[:40]
    return f"{stem}-{hashlib.sha256(uri.encode()).hexdigest()[:12]}"


def folder_bytes(root: str | Path) -> int:
    """Bytes the cache folder holds (entries and parts at their full size): what its limit bounds. Counted under
    the cache's lock when the folder exists, so that no claim, eviction or publication happens while it counts."""
    root = Path(root)
    if not root.is_dir():
        return 0
    with _FileLock(root / LOCK_NAME):
        return sum(_size(f) for f in root.rglob("*"))


def _size(path: Path) -> int:
    """A file's size; 0 for a folder or for a file gone since the folder was listed."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return 0
    return st.st_size if stat.S_ISREG(st.st_mode) else 0


@dataclass
class _Scan:
    used: int  # bytes of entries and parts
    entries: list[tuple[float, int, Path]]  # (mtime, size, path), evictable
    fetching: set[tuple[Path, str]]  # (folder, entry) of live parts


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class PackedCache:
    """The cache folder `root` (all stages), bounded by `limit` bytes; this stage's files go to root/<stage>."""

    def __init__(self, root: str | Path, limit: int, stage_uri: str):
        self.root = Path(root).expanduser()
        self.limit = int(limit)
        self.dir = self.root / stage_folder_name(stage_uri)
        self.host = re.sub(r"[^A-Za-z0-9]+", "", socket.gethostname())[:32] or "host"

    # ------------------------------------------------------------ start-up

    @classmethod
    def open(cls, cache_dir: str | None, cache_gb: float | None, stage) -> PackedCache:
        """The cache for a remote PackedStage, or a ValueError naming what to change (before training starts):
        a limit below one micro-batch's files (a micro-batch reads one tar and its index), a disk too small."""
        sizes = stage.file_bytes  # (files,) tar + index bytes, 0 for files not in the bucket
        total = int(sizes.sum())
        biggest = int(sizes.max()) if len(sizes) else 0
        shard = stage.files[int(sizes.argmax())] if len(sizes) else "-"
        if cache_gb is not None and cache_gb <= 0:
            raise ValueError(
                f"data.cache_gb {cache_gb}: a size in GB > 0, or unset for the whole stage ({total / GB:.3g})"
            )
        limit = total if cache_gb is None else int(cache_gb * GB)
        if limit < biggest:
            raise ValueError(
                f"data.cache_gb {cache_gb} is smaller than one micro-batch's files (shard {shard}: tar and index "
                f"{biggest / GB:.3g} GB): set data.cache_gb >= {_gb_up(biggest)}"
            )
        root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        cache = cls(root, limit, stage.loc.uri)
        try:
            cache.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(
                f"data.cache_dir {root}: cannot create it ({first_line(e)}): choose another folder"
            ) from None
        need = min(limit, total)
        free = shutil.disk_usage(root).free + folder_bytes(root)  # what the cache may hold there, its files included
        if free < need:
            what = f"data.cache_gb {cache_gb}" if cache_gb is not None else "the whole stage (data.cache_gb unset)"
            raise ValueError(
                f"data.cache_dir {root}: {free / GB:.3g} GB free for the cache, which needs {need / GB:.3g} GB for "
                f"{what}: free disk space, set data.cache_dir to a larger disk, or lower data.cache_gb "
                f"(at least {_gb_up(biggest)})"
            )
        if limit < total:
            log.warning(
                "packed cache %s: limit %.3g GB < the stage's %.3g GB: evicted files are fetched again every epoch",
                root,
                limit / GB,
                total / GB,
            )
        return cache

    # ------------------------------------------------------------ lookups and fetches

    def path(self, file: RemoteFile) -> Path:
        return self.dir / file.entry

    def lookup(self, file: RemoteFile) -> Path | None:
        """The cached copy of `file` (marked as just used), or None."""
        path = self.path(file)
        try:
            if path.stat().st_size != file.size:
                return None
            os.utime(path)  # LRU: just used
        except FileNotFoundError:
            return None
        return path

    def get(self, stage: Location, file: RemoteFile, wait: bool = True) -> Path | None:
        """The local path of `file` (stage/file.name), fetched if not cached.

        wait=False (a prefetch): None when another process is fetching it or the cache has no room now.
        A FetchError when the fetch failed after retries, or no room came within WAIT_S."""
        if file.size > self.limit:
            raise FetchError(f"{file.name}: {file.size} bytes, more than the packed cache's limit of {self.limit}")
        deadline = time.monotonic() + WAIT_S
        while True:
            if (hit := self.lookup(file)) is not None:
                return hit
            with self._locked():
                if (hit := self.lookup(file)) is not None:
                    return hit
                part = self._claim(file)
            if part is not None:
                return self._fetch(stage.join(file.name), file, part)
            if not wait:
                return None
            if time.monotonic() > deadline:
                raise FetchError(f"{file.name}: no room in the packed cache {self.root} after {WAIT_S:.0f} s")
            time.sleep(POLL_S)

    def _claim(self, file: RemoteFile) -> Path | None:
        """Under the lock: a part file reserving `file.size` bytes, made after evicting least recently used
        entries; None if another process is fetching this file or its parts leave no room now."""
        scan = self._scan()
        if (self.dir, file.entry) in scan.fetching:
            return None
        room = self.limit - scan.used
        evictable = sum(size for _, size, _ in scan.entries)
        if room + evictable < file.size:
            return None  # other fetches in flight hold the space: wait for them
        for _, size, path in sorted(scan.entries):
            if room >= file.size:
                break
            try:
                path.unlink()
                room += size
            except FileNotFoundError:
                pass
        part = self.dir / f".{file.entry}.part-{self.host}-{os.getpid()}"
        fd = os.open(part, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        try:
            os.ftruncate(fd, file.size)  # counted at its full size from now on
        finally:
            os.close(fd)
        return part

    def _fetch(self, src: Location, file: RemoteFile, part: Path) -> Path:
        def download() -> None:
            got = 0
            with src.fs.open_input_stream(src.path) as remote, open(part, "r+b") as out:
                while chunk := remote.read(CHUNK):
                    got += len(chunk)
                    if got > file.size:
                        break
                    out.write(chunk)
            if got != file.size:
                raise FetchError(f"{src.uri}: {got} bytes, the listing said {file.size} (changed since start-up?)")

        try:
            with_retries(download, attempts=FETCH_ATTEMPTS, what=f"fetch {src.uri}")
            with self._locked():  # published under the lock: a scan never misses it (module docstring)
                os.replace(part, self.path(file))
        except Exception as e:
            with self._locked():
                part.unlink(missing_ok=True)
            if isinstance(e, OSError):
                raise FetchError(f"{src.uri}: fetch failed: {first_line(e)}") from e
            raise
        return self.path(file)

    # ------------------------------------------------------------ the folder

    def _scan(self) -> _Scan:
        """Entries and parts of every stage under root; parts of dead processes of this host are deleted."""
        used, entries, fetching = 0, [], set()
        for folder in (d for d in self.root.iterdir() if d.is_dir()):
            for f in os.scandir(folder):
                try:
                    st = f.stat()
                except FileNotFoundError:
                    continue
                if not f.name.startswith("."):
                    used += st.st_size
                    entries.append((st.st_mtime, st.st_size, Path(f.path)))
                elif m := _PART.match(f.name):
                    if m["host"] == self.host and not _pid_alive(int(m["pid"])):
                        Path(f.path).unlink(missing_ok=True)  # a fetch that died: its space is free again
                        continue
                    used += st.st_size
                    fetching.add((Path(folder), m["entry"]))
        return _Scan(used, entries, fetching)

    def _locked(self):
        return _FileLock(self.root / LOCK_NAME)


class _FileLock:
    """flock on a file, through a descriptor of its own: excludes other processes and this process's threads."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX)
                return self
            except InterruptedError:
                continue
            except OSError as e:
                if e.errno != errno.EINTR:
                    os.close(self.fd)
                    raise

    def __exit__(self, *exc):
        os.close(self.fd)  # releases the lock


def _gb_up(nbytes: int) -> str:
    """A size in GB rounded up to two significant digits, to quote as a setting: 12_345 bytes -> '1.3e-05'."""
    x = nbytes / GB
    if x <= 0:
        return "0"
    step = 10 ** (math.floor(math.log10(x)) - 1)
    return f"{math.ceil(x / step - 1e-9) * step:.2g}"
