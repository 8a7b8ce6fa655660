"""The batch order (train.batch_plan): a pure function of (seed, epoch), one bucket and one file per batch,
every ok sample once per epoch on any world size, and a resume on another world size that covers the epoch
exactly once. The stage is written with the pack job's own writer (tests/train/conftest.py), without Ray."""

from collections import Counter

import pyarrow.parquet as pq
import pytest

from tests.train.conftest import MB, ROWS
from train.batch_plan import BatchPlanner, RankBatchSampler, batch_rows
from train.packed_stage import PackedStage
from unicap.contract import packed


def epoch_batches(stage, seed, epoch, mb=MB):
    planner = BatchPlanner(stage, mb, seed)
    n = planner.batches_per_epoch
    return [(r.file, r.bucket, tuple(batch_rows(r, seed))) for r in map(planner.ref, range(epoch * n, (epoch + 1) * n))]


def test_epoch_order_is_a_pure_function_of_seed_and_epoch(stage_dir):
    a, b = PackedStage(stage_dir), PackedStage(stage_dir)
    e0 = epoch_batches(a, 7, 0)
    assert e0 == epoch_batches(b, 7, 0)  # another process, the same order
    assert e0 != epoch_batches(a, 7, 1) and e0 != epoch_batches(a, 8, 0)
    planner = BatchPlanner(a, MB, 7)
    n = planner.batches_per_epoch
    assert n == sum(-(-int(x) // MB) for x in a.run_length)
    for f, bucket, rows in e0:  # one bucket, one file, at most micro_batch rows per batch
        t = pq.read_table(packed.index_path(stage_dir, a.files[f]), columns=["bucket", "status"]).to_pydict()
        assert {t["bucket"][r] for r in rows} == {bucket} and {t["status"][r] for r in rows} == {"ok"}
        assert 1 <= len(rows) <= MB


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_ok_sample_is_seen_once_per_epoch(stage_dir, world_size):
    stage = PackedStage(stage_dir)
    n = BatchPlanner(stage, MB, 0).batches_per_epoch
    for epoch in (0, 1):
        seen = Counter()
        for rank in range(world_size):
            sampler = RankBatchSampler(stage, MB, 0, rank, world_size, start=epoch * n)
            for ref in sampler:
                if ref.g >= (epoch + 1) * n:
                    break
                assert (ref.g - epoch * n) % world_size == rank and ref.epoch == epoch
                seen.update((ref.file, int(r)) for r in batch_rows(ref, 0))
        assert len(seen) == sum(ROWS) and set(seen.values()) == {1}


@pytest.mark.parametrize("fraction", [0.2, 0.5, 0.9])
def test_resume_on_another_world_size_sees_each_sample_once(stage_dir, fraction):
    """W=2 trains until `consumed` global batches (a multiple of W: the trainer saves at step ends),
    then W=3 resumes from there; the epoch is covered exactly once, as the uninterrupted run covers it."""
    stage = PackedStage(stage_dir)
    n = BatchPlanner(stage, MB, 0).batches_per_epoch
    consumed = 2 * int(fraction * n / 2)
    seen, gs = Counter(), []
    for world, start, stop in ((2, 0, consumed), (3, consumed, n)):
        for rank in range(world):
            for ref in RankBatchSampler(stage, MB, 0, rank, world, start=start):
                if ref.g >= stop:
                    break
                gs.append(ref.g)
                seen.update((ref.file, int(r)) for r in batch_rows(ref, 0))
    assert sorted(gs) == list(range(n))
    assert len(seen) == sum(ROWS) and set(seen.values()) == {1}
    uninterrupted = Counter()
    for ref in map(BatchPlanner(stage, MB, 0).ref, range(n)):
        uninterrupted.update((ref.file, int(r)) for r in batch_rows(ref, 0))
    assert uninterrupted == seen
