"""The trainer's data path: a packed stage (pipelines.pack) -> micro-batches of one bucket each, in an
order that is a pure function of (seed, epoch), split over ranks, resumable on any number of ranks.

    loader = make_loader(cfg.data, seed=cfg.run.seed, rank=rank, world_size=world, start=batches_consumed)
    for batch in loader:  # infinite
        batch["images"]    # (B, 3, H, W) float32 in [-1, 1]; one bucket, so one (H, W) per batch
        batch["captions"]  # list[str], B of them; "" for a dropped caption (classifier-free guidance)
        batch["keys"], batch["g"], batch["epoch"], batch["skipped"], batch["skip_reasons"]

Three modules: the stage's layout and its bucket runs (train/packed_stage.py), the order g -> BatchRef and each
rank's share of it (train/batch_plan.py), and here the reading of batches (PackedBatches, make_loader).

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

import io
import json
import logging
import os
import queue
import signal
import threading
from collections import Counter, OrderedDict

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from train.batch_plan import BatchPlanner, BatchRef, RankBatchSampler, batch_rows
from train.buckets import resize_to_bucket
from train.captions import CaptionPicker, sample_uniforms
from train.config import DataConfig
from train.packed_cache import FetchError, PackedCache, RemoteFile
from train.packed_stage import PackedStage
from unicap.contract import packed

log = logging.getLogger(__name__)


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
