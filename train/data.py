"""The trainer's data path: a packed stage (pipelines.pack) -> micro-batches of one bucket each, in an
order that is a pure function of (seed, epoch), split over ranks, resumable on any number of ranks.

    loader = make_loader(cfg.data, seed=cfg.run.seed, rank=rank, world_size=world, start=batches_consumed)
    for batch in loader:  # infinite
        batch["images"]    # (B, 3, H, W) float32 in [-1, 1]; one bucket, so one (H, W) per batch
        batch["captions"]  # list[str], B of them; "" for a dropped caption (classifier-free guidance)
        batch["keys"], batch["g"], batch["epoch"], batch["skipped"], batch["skip_reasons"]

The order. Epoch e's batch list depends on (seed, e, micro_batch) only, never on the world size:
  - every packed file holds its ok rows in runs, one per bucket (the pack sorts rows by bucket);
    each run is permuted (rng seeded by seed, e, file id, bucket) and cut into chunks of micro_batch
    (a run's last chunk may be smaller);
  - the list of all chunks is permuted (rng seeded by seed, e).
The stream is epoch 0's batches, then epoch 1's, ...: global batch g is position g % N of epoch g // N
(N batches per epoch). Rank r of W reads g = start + k*W + r, k = 0, 1, ... The trainer saves one
integer, `batches_consumed` (global batches consumed by all ranks: steps x grad_accum x W); passing it
back as `start` on any W continues exactly where the run stopped: no batch repeated, none skipped.
(Exact as long as the packed folder is unchanged; `PackedStage.fingerprint` identifies it.)

Memory per rank: the run table (files x buckets, a few hundred KB at 100M rows) and one int32 per
batch of the current epoch (4 / micro_batch bytes per row), in the main process only: the sampler
turns each g into a small BatchRef that a DataLoader worker reads. A worker holds the tar positions
of a few files (LRU) and their open file descriptors; no per-row Python object exists anywhere.

Bad data is skipped and counted, never a crash: a missing packed file at start-up (logged), and per
batch a missing or truncated tar, undecodable image bytes, unreadable captions (`skipped`, with
reasons, in every batch; the trainer sums them into its log and TensorBoard).

A remote stage (`data.packed` a URI, e.g. s3://bucket/packed/stage1; nodes that share no disk): at start-up
each rank lists the folder once (every file's size and modification time), reads `_pack.json` and the
indexes' bucket columns through unicap.storage, and opens a node-local cache (train/packed_cache.py:
data.cache_dir, bounded by data.cache_gb, LRU, shared by the node's ranks and workers). A batch's tar and
index are read from the cache. The sampler gives every BatchRef the files of this rank's next
data.cache_prefetch batches (`ahead`, within half the cache's share of this rank); the worker that reads the
batch starts fetching those in background threads, so a file is usually cached before its batch is read, and
the training step never waits on a fetch its worker could have started earlier. A file cached and unchanged
is never fetched again (the next epoch, the next run on the node). A fetch that fails after retries skips
the batch's rows, counted as "fetch_failed". The order, resume and skip counts are those of a local stage;
with a local `data.packed` nothing of this runs (no cache, no copy).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import queue
import signal
import threading
from collections import Counter, OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
from PIL import Image

from train.buckets import resize_to_bucket
from train.captions import CaptionPicker, sample_uniforms
from train.config import DataConfig
from train.packed_cache import FetchError, PackedCache, RemoteFile
from unicap import storage
from unicap.contract import packed

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- the stage: files and bucket runs


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


# ---------------------------------------------------------------- the order: g -> BatchRef


class BatchRef(NamedTuple):
    """Everything a worker needs to read global batch g: rows [chunk_start, +count) of the run's
    permutation (seeded by seed, epoch, file, bucket), offset by the run's first row in the file."""

    g: int
    epoch: int
    file: int
    bucket: int
    run_start: int  # first row of the run in the file's index
    run_length: int
    chunk_start: int  # position of the batch's first row in the run's permutation
    count: int
    ahead: tuple[int, ...] = ()  # a remote stage: files of this rank's next batches, for the worker to prefetch


class EpochPlan:
    """Epoch e's batch list: chunk ids permuted by rng(seed, e); a chunk id names (run, chunk in run)."""

    def __init__(self, stage: PackedStage, micro_batch: int, seed: int, epoch: int):
        chunks = -(-stage.run_length // micro_batch)  # (R,) batches per run
        self.first_chunk = np.concatenate([[0], np.cumsum(chunks)]).astype(np.int64)  # (R+1,)
        n = int(self.first_chunk[-1])
        self.order = np.arange(n, dtype=np.int32 if n < 2**31 else np.int64)  # (N,) 4 bytes per batch
        np.random.default_rng([seed, epoch, 0x5EED]).shuffle(self.order)

    def __len__(self) -> int:
        return len(self.order)

    def locate(self, position: int) -> tuple[int, int]:
        """(run, chunk index within the run) of the batch at `position` of the epoch."""
        c = int(self.order[position])
        run = int(np.searchsorted(self.first_chunk, c, side="right")) - 1
        return run, c - int(self.first_chunk[run])


class BatchPlanner:
    """g -> BatchRef over the infinite stream of epochs; keeps the current epoch's plan only."""

    def __init__(self, stage: PackedStage, micro_batch: int, seed: int):
        if stage.rows == 0:
            raise ValueError(f"packed stage {stage.packdir} has no ok rows to train on (see its _pack.json counts)")
        self.stage, self.micro_batch, self.seed = stage, micro_batch, seed
        self.batches_per_epoch = int((-(-stage.run_length // micro_batch)).sum())
        self._plan: EpochPlan | None = None
        self._epoch: int | None = None

    def plan(self, epoch: int) -> EpochPlan:
        if epoch != self._epoch:
            self._plan = None  # free the old plan first: one epoch's plan in memory at a time
            self._plan, self._epoch = EpochPlan(self.stage, self.micro_batch, self.seed, epoch), epoch
        return self._plan

    def ref(self, g: int) -> BatchRef:
        if g < 0:
            raise ValueError(f"global batch index {g} < 0")
        epoch, position = divmod(int(g), self.batches_per_epoch)
        run, chunk = self.plan(epoch).locate(position)
        s, mb = self.stage, self.micro_batch
        length = int(s.run_length[run])
        return BatchRef(
            g=int(g),
            epoch=epoch,
            file=int(s.run_file[run]),
            bucket=int(s.run_bucket[run]),
            run_start=int(s.run_start[run]),
            run_length=length,
            chunk_start=chunk * mb,
            count=min(mb, length - chunk * mb),
        )


def batch_rows(ref: BatchRef, seed: int) -> np.ndarray:
    """The file rows of a batch: (count,) int64, from the run's permutation for (seed, epoch, file, bucket)."""
    perm = np.random.default_rng([seed, ref.epoch, ref.file, ref.bucket]).permutation(ref.run_length)
    return ref.run_start + perm[ref.chunk_start : ref.chunk_start + ref.count]


class RankBatchSampler(torch.utils.data.Sampler):
    """This rank's share of the global batch stream: g = start + k * world_size + rank, as BatchRefs.

    Infinite. `start` is the trainer's batches_consumed (global batches, all ranks together).
    With `ahead` > 0 (a remote stage), each BatchRef also names the distinct files of this rank's next `ahead`
    batches, as many as fit in `ahead_bytes` (stage.file_bytes): the files its worker prefetches."""

    def __init__(
        self,
        stage: PackedStage,
        micro_batch: int,
        seed: int,
        rank: int,
        world_size: int,
        start: int = 0,
        ahead: int = 0,
        ahead_bytes: int = 0,
    ):
        assert 0 <= rank < world_size, f"rank {rank} of world size {world_size}"
        self.planner = BatchPlanner(stage, micro_batch, seed)
        self.rank, self.world_size, self.start = rank, world_size, start
        self.ahead, self.ahead_bytes = ahead, ahead_bytes
        self.file_bytes = stage.file_bytes if ahead else None

    def __iter__(self):
        g = self.start + self.rank
        if not self.ahead:
            while True:
                yield self.planner.ref(g)
                g += self.world_size
        window = deque(self.planner.ref(g + k * self.world_size) for k in range(self.ahead + 1))  # this, then ahead
        while True:
            ref = window.popleft()
            window.append(self.planner.ref(ref.g + (self.ahead + 1) * self.world_size))
            yield ref._replace(ahead=self._files_ahead(ref.file, window))

    def _files_ahead(self, current: int, window: deque) -> tuple[int, ...]:
        files, budget = [], self.ahead_bytes
        for ref in window:
            if ref.file == current or ref.file in files:
                continue
            budget -= int(self.file_bytes[ref.file])
            if budget < 0:
                break
            files.append(ref.file)
        return tuple(files)


# ---------------------------------------------------------------- reading batches


class PackedBatches(torch.utils.data.Dataset):
    """Map-style dataset of whole micro-batches: dataset[BatchRef or global batch index g] -> batch dict.

    A remote stage needs `cache`: a batch's files are read from it (fetched if missing), and the files its
    BatchRef names `ahead` are fetched by PREFETCH_THREADS background threads of the reading process."""

    POSITIONS_CACHED = 16  # files whose tar positions a worker keeps (about 32 bytes per row each)
    FDS_CACHED = 64
    PREFETCH_THREADS = 2  # per loader worker (per rank when num_workers is 0)
    OPEN_TRIES = 3  # a cached file evicted by another process between its lookup and its open is asked again

    def __init__(self, stage: PackedStage, cfg: DataConfig, seed: int, cache: PackedCache | None = None):
        if stage.is_remote and cache is None:
            raise ValueError(f"{stage.packdir} is a remote stage: its batches are read through a PackedCache")
        self.stage, self.cfg, self.seed, self.cache = stage, cfg, seed, cache
        self.picker = CaptionPicker(cfg, stage.levels, stage.languages)
        self._planner: BatchPlanner | None = None  # only for integer indices
        self._positions: OrderedDict[int, np.ndarray | None] = OrderedDict()
        self._fds: OrderedDict[int, int | None] = OrderedDict()
        self._pid = os.getpid()
        self._prefetcher: _Prefetcher | None = None  # made in the process that reads (a worker), on first use

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_prefetcher": None}  # threads do not travel to a spawned worker

    def __getitem__(self, index: BatchRef | int) -> dict:
        if not isinstance(index, BatchRef):
            if self._planner is None:
                self._planner = BatchPlanner(self.stage, self.cfg.micro_batch, self.seed)
            index = self._planner.ref(index)
        return self.read(index)

    def read(self, ref: BatchRef) -> dict:
        w, h = self.stage.buckets[ref.bucket]
        shard = self.stage.files[ref.file]
        rows = batch_rows(ref, self.seed)  # (B,)
        u = sample_uniforms(self.seed, ref.epoch, ref.file, rows)  # (B, 5)
        if self.cfg.group_caption_levels and len(u):
            # the first sample's level x language draw for all: each sample's odds are unchanged, and the
            # micro-batch is a function of (seed, epoch, micro_batch), not of the world size: a resume draws the same
            u[:, 2:4] = u[0, 2:4]
        images, captions, keys, reasons = [], [], [], Counter()
        positions, fd, failure = self._open_remote(ref) if self.cache else self._open_local(ref.file)
        try:
            for row, ui in zip(rows, u, strict=True):
                if failure:
                    reasons[failure] += 1
                    continue
                sample = self._read_sample(fd, positions[row], (w, h))
                if isinstance(sample, str):
                    reasons[sample] += 1
                    log.warning("skipped row %d of %s: %s", row, shard, sample)
                    continue
                image, text = sample
                caption = self.picker(text, ui)
                if caption is None:
                    reasons["no_caption"] += 1
                    log.warning("skipped %s of %s: no caption", text.get("key"), shard)
                    continue
                images.append(image)
                captions.append(caption)
                keys.append(text["key"])
        finally:
            if self.cache is not None and fd is not None:
                os.close(fd)  # a remote stage's tar is opened per batch: the cache may evict it afterwards
        return {
            "images": _to_tensor(images, w, h),
            "captions": captions,
            "keys": keys,
            "g": ref.g,
            "epoch": ref.epoch,
            "bucket": (w, h),
            "skipped": sum(reasons.values()),
            "skip_reasons": dict(reasons),
        }

    def _read_sample(self, fd: int, pos: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, dict] | str:
        """One pread covers the image and its captions json (the pack writes them adjacent); a reason on failure."""
        offset, nbytes, json_offset, json_size = (int(v) for v in pos)
        lo, hi = min(offset, json_offset), max(offset + nbytes, json_offset + json_size)
        try:
            buf = os.pread(fd, hi - lo, lo)
        except OSError:
            return "unreadable_tar"
        if len(buf) < hi - lo:
            return "truncated_tar"
        try:
            text = json.loads(buf[json_offset - lo : json_offset - lo + json_size])
        except ValueError:
            return "bad_caption_json"
        try:
            with Image.open(io.BytesIO(buf[offset - lo : offset - lo + nbytes])) as im:
                im = im.convert("RGB")
        except Exception:  # noqa: BLE001 - any decoder error is a skipped sample, never a crash
            return "undecodable_image"
        if im.size != size:  # a pack from older bucket code: resize rather than fail
            im = resize_to_bucket(im, size)
        return np.asarray(im), text  # (H, W, 3) uint8

    def _open_local(self, file: int) -> tuple[np.ndarray | None, int | None, str | None]:
        """(positions, tar descriptor, None), or a skip reason in place of the None when either is missing."""
        positions, fd = self._file_positions(file), self._fd(file)
        return positions, fd, ("missing_file" if positions is None or fd is None else None)

    def _open_remote(self, ref: BatchRef) -> tuple[np.ndarray | None, int | None, str | None]:
        """As _open_local, through the cache (fetching what is missing); first the prefetch of `ref.ahead`.
        The descriptor is the caller's to close."""
        self._prefetch(ref.ahead)
        shard = self.stage.files[ref.file]
        tar, index = (self.stage.remote.get(name) for name in packed.shard_files(shard))
        if tar is None or index is None:
            return None, None, "missing_file"  # not in the bucket at start-up
        try:
            for _ in range(self.OPEN_TRIES):
                try:
                    positions = self._file_positions(ref.file, index)
                    if positions is None:
                        return None, None, "missing_file"
                    return positions, os.open(self.cache.get(self.stage.loc, tar), os.O_RDONLY), None
                except FileNotFoundError:  # evicted by another process since its lookup: ask again
                    continue
            raise FetchError(f"{shard}: evicted {self.OPEN_TRIES} times before it could be opened (cache too small?)")
        except FetchError as e:
            log.warning("packed shard %s not fetched (%s): its samples are skipped", shard, e)
            return None, None, "fetch_failed"

    def _prefetch(self, files: tuple[int, ...]) -> None:
        if not files:
            return
        if self._prefetcher is None or self._prefetcher.pid != os.getpid():
            self._prefetcher = _Prefetcher(self.PREFETCH_THREADS)
        for file in files:
            names = packed.shard_files(self.stage.files[file])
            remote = [self.stage.remote[n] for n in names if n in self.stage.remote]
            self._prefetcher.submit(file, lambda remote=remote: self._fetch_quietly(remote))

    def _fetch_quietly(self, remote: list[RemoteFile]) -> None:
        for f in remote:
            try:
                self.cache.get(self.stage.loc, f, wait=False)  # busy elsewhere or no room now: the read will wait
            except FetchError as e:
                log.info("prefetch of %s failed (%s); the batch that needs it will try again", f.name, e)

    def _file_positions(self, file: int, index: RemoteFile | None = None) -> np.ndarray | None:
        """(rows, 4) int64 [offset, size, json_offset, json_size] of a file; None if its index is gone.

        `index`: a remote stage's index, read from the cache (a FetchError, or a FileNotFoundError when another
        process evicted it before it was opened)."""
        if file in self._positions:
            self._positions.move_to_end(file)
            return self._positions[file]
        if index is None:
            path = packed.index_path(self.stage.packdir, self.stage.files[file])
        else:
            path = self.cache.get(self.stage.loc, index)
        try:
            with open(path, "rb") as f:
                t = pq.read_table(f, columns=packed.POSITION_COLUMNS)
            pos = np.stack([t.column(c).fill_null(0).to_numpy() for c in packed.POSITION_COLUMNS], axis=1)
            pos = pos.astype(np.int64)
        except FileNotFoundError as e:
            if index is not None:
                raise
            log.warning("packed index %s unreadable (%s): its samples are skipped", path, e)
            pos = None
        except (OSError, ValueError) as e:
            log.warning("packed index %s unreadable (%s): its samples are skipped", path, e)
            pos = None
        self._positions[file] = pos
        if len(self._positions) > self.POSITIONS_CACHED:
            self._positions.popitem(last=False)
        return pos

    def _fd(self, file: int) -> int | None:
        if os.getpid() != self._pid:  # a forked worker: descriptors are shared, keep our own table
            self._fds, self._pid = OrderedDict(), os.getpid()
        if file in self._fds:
            self._fds.move_to_end(file)
            return self._fds[file]
        path = packed.tar_path(self.stage.packdir, self.stage.files[file])
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            log.warning("packed tar %s unreadable (%s): its samples are skipped", path, e)
            fd = None
        self._fds[file] = fd
        if len(self._fds) > self.FDS_CACHED:
            old = self._fds.popitem(last=False)[1]
            if old is not None:
                os.close(old)
        return fd


class _Prefetcher:
    """Daemon threads that run fetches in the background of one process, one pending fetch per file id.

    Daemon threads: a worker that exits does not wait for a fetch in flight (its part file is cleaned up by the
    next process that scans the cache)."""

    def __init__(self, threads: int):
        self.pid = os.getpid()
        self.pending: set[int] = set()
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(threads):
            threading.Thread(target=self._run, daemon=True, name="packed-prefetch").start()

    def submit(self, file: int, fetch) -> None:
        if file not in self.pending:
            self.pending.add(file)
            self.queue.put((file, fetch))

    def _run(self) -> None:
        while True:
            file, fetch = self.queue.get()
            try:
                fetch()
            except Exception:  # noqa: BLE001 - a prefetch never fails a batch: the read fetches again and counts
                log.exception("prefetch of file %d failed", file)
            finally:
                self.pending.discard(file)


def _to_tensor(images: list[np.ndarray], w: int, h: int) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [-1, 1]; B may be 0 when every sample was skipped."""
    if not images:
        return torch.zeros(0, 3, h, w, device="cpu")
    # numpy, not torch ops: torch's intra-op threads on a busy CPU made this 30x slower (16 vs 0.5 ms)
    x = np.ascontiguousarray(np.stack(images).transpose(0, 3, 1, 2)).astype(np.float32)  # (B, 3, H, W)
    np.divide(x, 127.5, out=x)
    x -= 1.0
    return torch.from_numpy(x)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # workers decode with Pillow; the rank's threads belong to the model
    # a scheduler signals every process of the job: the rank saves a checkpoint and shuts its workers
    # down; a worker that died first would fail the batch fetch the rank still needs before it can save
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_loader(cfg: DataConfig, seed: int, rank: int, world_size: int, start: int = 0) -> torch.utils.data.DataLoader:
    """This rank's infinite loader over the packed stage `cfg.packed` (a folder or a URI), starting at global batch
    `start` (the trainer's batches_consumed). Each item is one micro-batch dict (see the module docstring).

    Bad input is refused here, in one line, before the first batch: no _pack.json (NotAPackedStage), and for
    a URI a missing bucket or credentials (StorageError), a cache limit below one micro-batch's files or a cache
    folder on a disk too small for it (ValueError)."""
    stage = PackedStage(cfg.packed)
    if stage.resolution != cfg.resolution:
        raise ValueError(
            f"{cfg.packed} was packed at {stage.resolution} px but data.resolution is {cfg.resolution}: "
            f"pack the stage at {cfg.resolution} (unicap pack --resolution {cfg.resolution})"
        )
    cache, ahead, ahead_bytes = None, 0, 0
    if stage.is_remote:
        cache = PackedCache.open(cfg.cache_dir, cfg.cache_gb, stage)
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # ranks of this node, sharing the cache
        ahead, ahead_bytes = cfg.cache_prefetch, cache.limit // (2 * local_ranks)
    workers = cfg.num_workers
    sampler = RankBatchSampler(stage, cfg.micro_batch, seed, rank, world_size, start, ahead, ahead_bytes)
    return torch.utils.data.DataLoader(
        PackedBatches(stage, cfg, seed, cache),
        batch_size=None,
        sampler=sampler,
        num_workers=workers,
        prefetch_factor=cfg.prefetch_factor if workers else None,
        persistent_workers=workers > 0,
        worker_init_fn=_worker_init if workers else None,
    )


def check_packed(packdir: str) -> None:
    """Fail fast, before any rank starts, when `data.packed` (a folder or a URI) is no packed stage: a one-line
    NotAPackedStage, or a StorageError for a missing bucket or credentials. Reads no index."""
    loc = storage.resolve(packdir or ".")
    if not loc.is_local:
        storage.check_readable(loc)
    if not packdir or not loc.join(packed.PACK_META).is_file():
        raise NotAPackedStage(f"data.packed {packdir!r} is not a packed stage (no {packed.PACK_META}): unicap pack")
