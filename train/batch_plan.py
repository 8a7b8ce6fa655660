"""The order: global batch g -> BatchRef, a pure function of (seed, epoch, micro_batch) over a PackedStage's
bucket runs, never of the world size; and each rank's share of the stream, resumable from one integer
(`batches_consumed`) on any number of ranks. The order itself is written down in train/data.py's docstring."""

from __future__ import annotations

from collections import deque
from typing import NamedTuple

import numpy as np
import torch

from train.packed_stage import PackedStage


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
