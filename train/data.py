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
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import signal
from collections import Counter, OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from train.buckets import resize_to_bucket
from train.captions import CaptionPicker, sample_uniforms
from train.config import DataConfig
from unicap.contract import packed

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- the stage: files and bucket runs


def _file_runs(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(bucket, first row, rows) of each run of ok rows in one packed index; None if unreadable."""
    try:
        b = pq.read_table(path, columns=packed.RUN_COLUMNS).column("bucket").to_numpy()  # (n,) int16
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


class PackedStage:
    """A packed stage's layout: file list, bucket table, and its bucket runs (one per file x bucket).

    Reads `_pack.json` and each index's int16 `bucket` column once; keeps only the run table."""

    def __init__(self, packdir: str | Path, threads: int = 8):
        self.packdir = Path(packdir)
        meta_path = self.packdir / packed.PACK_META
        if not meta_path.exists():
            raise FileNotFoundError(f"{self.packdir} is not a packed stage (no {packed.PACK_META}): unicap pack")
        meta = json.loads(meta_path.read_text())
        self.resolution: int = meta["resolution"]
        self.buckets: list[tuple[int, int]] = [tuple(b) for b in meta["buckets"]]
        self.levels: tuple[str, ...] = tuple(meta["levels"])
        self.languages: tuple[str, ...] = tuple(meta["languages"])
        self.complete: bool = meta.get("complete", False)
        self.files: list[str] = list(meta["shards"])  # file id = position here (fixed by the pack)
        paths = [packed.index_path(self.packdir, s) for s in self.files]
        with ThreadPoolExecutor(threads) as pool:  # Parquet reads release the GIL
            found = list(pool.map(lambda p: _file_runs(p) if p.exists() else None, paths))
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

    Infinite. `start` is the trainer's batches_consumed (global batches, all ranks together)."""

    def __init__(self, stage: PackedStage, micro_batch: int, seed: int, rank: int, world_size: int, start: int = 0):
        assert 0 <= rank < world_size, f"rank {rank} of world size {world_size}"
        self.planner = BatchPlanner(stage, micro_batch, seed)
        self.rank, self.world_size, self.start = rank, world_size, start

    def __iter__(self):
        g = self.start + self.rank
        while True:
            yield self.planner.ref(g)
            g += self.world_size


# ---------------------------------------------------------------- reading batches


class PackedBatches(torch.utils.data.Dataset):
    """Map-style dataset of whole micro-batches: dataset[BatchRef or global batch index g] -> batch dict."""

    POSITIONS_CACHED = 16  # files whose tar positions a worker keeps (about 32 bytes per row each)
    FDS_CACHED = 64

    def __init__(self, stage: PackedStage, cfg: DataConfig, seed: int):
        self.stage, self.cfg, self.seed = stage, cfg, seed
        self.picker = CaptionPicker(cfg, stage.levels, stage.languages)
        self._planner: BatchPlanner | None = None  # only for integer indices
        self._positions: OrderedDict[int, np.ndarray | None] = OrderedDict()
        self._fds: OrderedDict[int, int | None] = OrderedDict()
        self._pid = os.getpid()

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
        positions, fd = self._file_positions(ref.file), self._fd(ref.file)
        for row, ui in zip(rows, u, strict=True):
            if positions is None or fd is None:
                reasons["missing_file"] += 1
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

    def _file_positions(self, file: int) -> np.ndarray | None:
        """(rows, 4) int64 [offset, size, json_offset, json_size] of a file; None if its index is gone."""
        if file in self._positions:
            self._positions.move_to_end(file)
            return self._positions[file]
        path = packed.index_path(self.stage.packdir, self.stage.files[file])
        try:
            t = pq.read_table(path, columns=packed.POSITION_COLUMNS)
            pos = np.stack([t.column(c).fill_null(0).to_numpy() for c in packed.POSITION_COLUMNS], axis=1)
            pos = pos.astype(np.int64)
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
    """This rank's infinite loader over the packed stage `cfg.packed`, starting at global batch `start`
    (the trainer's batches_consumed). Each item is one micro-batch dict (see the module docstring)."""
    stage = PackedStage(cfg.packed)
    if stage.resolution != cfg.resolution:
        raise ValueError(
            f"{cfg.packed} was packed at {stage.resolution} px but data.resolution is {cfg.resolution}: "
            f"pack the stage at {cfg.resolution} (unicap pack --resolution {cfg.resolution})"
        )
    workers = cfg.num_workers
    return torch.utils.data.DataLoader(
        PackedBatches(stage, cfg, seed),
        batch_size=None,
        sampler=RankBatchSampler(stage, cfg.micro_batch, seed, rank, world_size, start),
        num_workers=workers,
        prefetch_factor=cfg.prefetch_factor if workers else None,
        persistent_workers=workers > 0,
        worker_init_fn=_worker_init if workers else None,
    )
