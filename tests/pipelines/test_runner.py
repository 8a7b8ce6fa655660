import os

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.runner import ShardJob, run_sharded
from unicap.runtime import cpu_threads_per_actor

SCHEMA = pa.schema([pa.field("key", pa.string()), pa.field("shard", pa.string()), pa.field("threads", pa.int32())])


class ThreadsStage:
    """Reports the compute threads torch has inside the actor."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        n = batch.num_rows
        return pa.table({"key": batch.column("key"), "shard": batch.column("shard"),
                         "threads": pa.array([torch.get_num_threads()] * n, pa.int32())})  # fmt: skip


def test_cpu_actors_get_their_share_of_the_cores(ray_local, synth_shards, tmp_path):
    """Ray sets OMP_NUM_THREADS to an actor's num_cpus (1 for 0.5): CPU inference ran on one thread
    until the runner passed the actor its share of the cores (caption job 0.76x -> see bench)."""
    job = ShardJob(name="threads", stage_cls=ThreadsStage, stage_kwargs={}, schema=SCHEMA,
                   stats_fn=lambda t: {"rows": t.num_rows}, failure_table=lambda f: SCHEMA.empty_table(),
                   num_cpus=0.5)  # fmt: skip  (no threads=: the runner's default for a CPU actor)
    run_sharded(job, synth_shards, tmp_path, batch_size=4, limit_shards=1)
    threads = set(pq.read_table(tmp_path).column("threads").to_pylist())
    assert threads == {max(1, os.cpu_count() or 1)}
    assert cpu_threads_per_actor(2) == max(1, (os.cpu_count() or 1) // 2)
