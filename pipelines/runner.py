"""The shared driver of every per-shard Ray Data job (caption, score).

    pending shards (complete in the input, absent from the output)
      -> read_shards -> map_batches(job's actor stage, an actor pool) -> driver
      -> ShardCollector: one output file per shard, atomically, when all its rows are in

Index rows that never became images (download or decode failures at ingest) are turned into the
job's own failure rows by `job.failure_table`, so every input row comes out exactly once.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from datagen.shards import list_shards, read_shards
from pipelines.sink import STATS_DIR, ShardCollector, done_shards, expected_rows
from unicap import runtime
from unicap.atomic import write_json
from unicap.contract import caption as caption_record
from unicap.contract.shards import SUCCESS, index_path


@dataclass
class ShardJob:
    name: str
    stage_cls: type  # Ray Data actor: __init__(**stage_kwargs), __call__(pa.Table) -> pa.Table
    stage_kwargs: dict
    schema: pa.Schema
    stats_fn: Callable[[pa.Table], dict]
    failure_table: Callable[[list[dict]], pa.Table]  # index failure records -> rows of `schema`
    write_fn: Callable[[Path, str, pa.Table], None] | None = None
    num_cpus: float = 0.5
    num_gpus: float = 0
    env_vars: dict = field(default_factory=dict)
    # OpenMP/torch threads per actor. Ray sets OMP_NUM_THREADS to an actor's num_cpus (1 for a
    # fractional claim), which starves CPU inference. None: CPU actors (num_gpus 0) get their share
    # of the cores (runtime.cpu_threads_per_actor), GPU actors keep Ray's choice.
    threads: int | None = None
    # Jobs whose output rows are not the input index's rows (pack: a stage manifest's rows of a shard):
    # rows each shard will output (default: its index rows), and rows the driver writes itself
    # before reading (default: failure_table(index failures)); the actor drops rows it does not own.
    expected_rows: Callable[[list[str]], dict[str, int]] | None = None
    initial_rows: Callable[[str], pa.Table | None] | None = None


def actor_threads(job: ShardJob, concurrency: int) -> int | None:
    if job.threads is not None:
        return job.threads
    return runtime.cpu_threads_per_actor(concurrency) if not job.num_gpus else None


def index_failures(input_dir: str | Path, shard: str) -> list[dict]:
    """The shard's index rows that are not images: key, shard, sha256, source, original_caption, error."""
    out = []
    for r in pq.read_table(index_path(input_dir, shard)).to_pylist():
        if r["status"] == SUCCESS:
            continue
        msg = r.get("error_message") or r["status"]
        error = msg if caption_record.error_reason(msg) in caption_record.ERROR_REASONS else f"download_failed: {msg}"
        out.append({"key": r["key"], "shard": shard, "sha256": r.get("sha256"), "source": r.get("url"),
                    "original_caption": r.get("caption"), "error": error[:2000]})  # fmt: skip
    return out


def repair_stats(output: Path, stats_fn: Callable[[pa.Table], dict]) -> None:
    """A kill between a shard's Parquet and its stats file: rebuild the stats from the Parquet."""
    for shard in done_shards(output):
        path = output / STATS_DIR / f"{shard}.json"
        if not path.exists():
            write_json({"shard": shard, **stats_fn(pq.read_table(output / f"{shard}.parquet"))}, path)


def summarise(output: Path, run: dict) -> dict:
    """Totals over every shard's stats (all runs so far) plus this run's numbers -> _summary.json."""
    totals, reasons, sums = Counter(), Counter(), Counter()
    for p in sorted((output / STATS_DIR).glob("*.json")):
        s = json.loads(p.read_text())
        totals.update(s.get("status", {}))
        reasons.update(s.get("failures_by_reason", {}))
        sums.update({k: v for k, v in s.items() if isinstance(v, int | float) and k != "written_at"})
    summary = {"output": str(output), "shards": len(done_shards(output)), **dict(sums), "status": dict(totals),
               "failures_by_reason": dict(reasons.most_common()), "last_run": run}  # fmt: skip
    write_json(summary, output / "_summary.json")
    return summary


def run_sharded(
    job: ShardJob,
    input_dir: str | Path,
    output: str | Path,
    *,
    batch_size: int = 16,
    concurrency: int = 1,
    address: str | None = None,
    limit_shards: int | None = None,
    on_batch: Callable[[pa.Table], None] | None = None,
    shards: list[str] | None = None,
) -> dict:
    """Run `job` over the pending shards of `input_dir` (or of `shards`); returns this run's numbers."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    repair_stats(output, job.stats_fn)
    shards = list_shards(input_dir) if shards is None else shards
    shards = [s for s in shards if s not in done_shards(output)]
    if limit_shards is not None:
        shards = shards[:limit_shards]
    t0, rows = time.time(), 0

    def on_shard(shard: str, stats: dict) -> None:
        status = stats.get("status", {})
        print(f"[{job.name}] shard {shard}: {stats['rows']} rows {status} -> {output / (shard + '.parquet')}", flush=True)

    expected = job.expected_rows(shards) if job.expected_rows else expected_rows(input_dir, shards)
    sink = ShardCollector(output, expected, job.schema, stats_fn=job.stats_fn, on_shard=on_shard,
                          write_fn=job.write_fn)  # fmt: skip
    for shard in shards:
        if job.initial_rows:
            first = job.initial_rows(shard)
        else:
            failures = index_failures(input_dir, shard)
            first = job.failure_table(failures) if failures else None
        if first is not None and first.num_rows:
            sink.add_batch(first)
    pending = [s for s in shards if s in sink.expected]
    if pending:
        runtime.init_ray(address)
        ds = read_shards(input_dir, pending).map_batches(
            job.stage_cls,
            fn_constructor_kwargs=job.stage_kwargs,
            batch_size=batch_size,
            batch_format="pyarrow",
            concurrency=concurrency,
            num_cpus=job.num_cpus,
            num_gpus=job.num_gpus,
            runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", **runtime.threads_env(actor_threads(job, concurrency)),
                                      **job.env_vars}},
        )
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            sink.add_batch(batch)
            rows += batch.num_rows
            if on_batch:
                on_batch(batch)
    sink.close()
    wall = time.time() - t0
    return {"shards_written": sink.written, "images": rows, "seconds": round(wall, 2),
            "images_per_s": round(rows / wall, 2) if wall and rows else 0.0}  # fmt: skip
