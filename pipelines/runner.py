"""The shared driver of every per-shard Ray Data job (caption, score, pack).

    pending shards (complete in the input, absent from the output)
      -> read_shards (each tar read against its index) -> map_batches(GuardedStage(job's stage), actor pool)
      -> driver -> ShardCollector: one output file per shard, atomically, when all its keys are in

Every input row comes out exactly once, and one bad item costs only itself:
- index rows that never became images (download or decode failures at ingest) are turned into the
  job's own failure rows by `job.failure_table`;
- items the reader could not deliver (missing from a truncated tar, an invalid {key}.json, ...) carry
  a `read_error`: GuardedStage makes them failure rows the same way, without calling the stage;
- an exception in the stage is retried item by item; an item that still raises is its own failure
  row (`processing_error: ...`), the rest of the batch goes on;
- tar samples that belong to no input row (a key the index lacks, a second sample of a key) are refused
  by the collector and counted in the shard's stats (refused_samples).
A shard that fails as a whole (its tar cannot be opened, a task died) is not written: the other
shards go on, and the job ends with IncompleteJobError naming it (exit status 1 on the command
line), after writing _summary.json. Re-running redoes exactly the shards that are not written.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from datagen.shards import is_complete, list_shards, read_shards
from pipelines.sink import STATS_DIR, ShardCollector, done_shards
from unicap import runtime
from unicap.atomic import write_json
from unicap.contract import caption as caption_record
from unicap.contract.shards import READ_ERROR, SUCCESS, index_path


class IncompleteJobError(RuntimeError):
    """Some shards could not be completed (and were not written); the others were. `summary` is the
    job's _summary.json content, `failed` maps each unwritten shard to why."""

    def __init__(self, message: str, summary: dict, failed: dict[str, str]):
        super().__init__(message)
        self.summary, self.failed = summary, failed


@dataclass
class ShardJob:
    name: str
    stage_cls: type  # Ray Data actor: __init__(**stage_kwargs), __call__(pa.Table) -> pa.Table
    stage_kwargs: dict
    schema: pa.Schema
    stats_fn: Callable[[pa.Table], dict]
    # failure records (key, shard, sha256, source, original_caption, error) -> rows of `schema`. Runs in the
    # driver (index failures) and in the actors (items the reader could not deliver, items that raised).
    failure_table: Callable[[list[dict]], pa.Table]
    write_fn: Callable[[Path, str, pa.Table], None] | None = None
    num_cpus: float = 0.5
    num_gpus: float = 0
    env_vars: dict = field(default_factory=dict)
    # OpenMP/torch threads per actor. Ray sets OMP_NUM_THREADS to an actor's num_cpus (1 for a
    # fractional claim), which starves CPU inference. None: CPU actors (num_gpus 0) get their share
    # of the cores (runtime.cpu_threads_per_actor), GPU actors keep Ray's choice.
    threads: int | None = None
    # Batches one actor works on at once, each on a thread of its own (Ray's max_concurrency): with 2, the
    # next batch's CPU work (decode, resize: C code that releases the GIL) overlaps the engine's run on this
    # one. A stage that takes more than 1 must be thread-safe (the caption stage serialises its engine calls).
    max_concurrency: int = 1
    # Jobs whose output rows are not the input index's rows (pack: a stage manifest's rows of a shard):
    # the keys each shard will output (default: its index keys), and rows the driver writes itself
    # (default: failure_table(index failures)); the actor drops rows it does not own. Both are called
    # when a shard is first touched, so that memory follows the shards in flight.
    expected_keys: Callable[[str], set[str]] | None = None
    initial_rows: Callable[[str], pa.Table | None] | None = None


def actor_threads(job: ShardJob, concurrency: int) -> int | None:
    if job.threads is not None:
        return job.threads
    return runtime.cpu_threads_per_actor(concurrency) if not job.num_gpus else None


def actor_pool(job: ShardJob, concurrency: int) -> dict:
    """map_batches' actors: `concurrency` of them, each taking job.max_concurrency calls at once when above 1."""
    if job.max_concurrency == 1:
        return {"concurrency": concurrency}
    import ray

    strategy = ray.data.ActorPoolStrategy(
        size=concurrency, max_concurrent_calls_per_actor=job.max_concurrency, enable_true_multi_threading=True
    )
    return {"compute": strategy}


def index_failures(input_dir: str | Path, shard: str) -> list[dict]:
    """The shard's index rows that are not images: key, shard, sha256, source, original_caption, error."""
    out = []
    for r in pq.read_table(index_path(input_dir, shard)).to_pylist():
        if r["status"] == SUCCESS:
            continue
        msg = r.get("error_message") or r["status"]
        known = caption_record.error_reason(msg) in caption_record.ERROR_REASONS
        error = msg if known else f"download_failed: {msg}"
        where = {"key": r["key"], "shard": shard, "sha256": r.get("sha256"), "source": r.get("url")}
        out.append(failure_record({**where, "original_caption": r.get("caption")}, error))
    return out


def index_keys(input_dir: str | Path, shard: str) -> set[str]:
    """Every key of the shard's index (failures included): what its output must hold."""
    return set(pq.read_table(index_path(input_dir, shard), columns=["key"]).column("key").to_pylist())


def failure_record(row: dict, error: str) -> dict:
    """A reader row (or part of one) -> the failure record every job's failure_table takes."""
    where = {"key": row["key"], "shard": row["shard"], "sha256": row.get("sha256"), "source": row.get("source")}
    return {**where, "original_caption": row.get("original_caption"), "error": error[:2000]}


class GuardedStage:
    """Ray Data actor around a job's stage: one bad item costs only itself.

    Rows with a `read_error` become failure rows without reaching the stage; an exception on a
    batch is retried item by item, and an item that still raises becomes a `processing_error`
    failure row (the exception is printed to the job's log)."""

    def __init__(self, stage_cls: type, stage_kwargs: dict, failure_table: Callable, schema: pa.Schema):
        self.stage = stage_cls(**stage_kwargs)
        self.failure_table, self.schema = failure_table, schema

    def __call__(self, batch: pa.Table) -> pa.Table:
        parts = []
        if READ_ERROR in batch.column_names:
            bad = pc.is_valid(batch.column(READ_ERROR))
            problems = batch.filter(bad).drop_columns(["image"]).to_pylist()
            if problems:
                parts.append(self.failure_table([failure_record(r, r[READ_ERROR]) for r in problems]))
            batch = batch.filter(pc.invert(bad)).drop_columns([READ_ERROR])
        if batch.num_rows:
            parts += self._process(batch)
        rows = [r for p in parts for r in p.to_pylist()]
        return pa.Table.from_pylist(rows, schema=self.schema)

    def _process(self, batch: pa.Table) -> list[pa.Table]:
        try:
            return [self.stage(batch)]
        except Exception as e:  # noqa: BLE001 - one item's exception is that item's failure row
            if batch.num_rows > 1:
                return [t for i in range(batch.num_rows) for t in self._process(batch.slice(i, 1))]
            item = batch.drop_columns(["image"]) if "image" in batch.column_names else batch
            row = item.to_pylist()[0]
            where = f"[{type(self.stage).__name__}] item {row['key']} of shard {row['shard']}"
            print(f"{where} raised:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
            return [self.failure_table([failure_record(row, f"processing_error: {type(e).__name__}: {e}")])]


def repair_stats(output: Path, stats_fn: Callable[[pa.Table], dict]) -> None:
    """A kill between a shard's Parquet and its stats file: rebuild the stats from the Parquet."""
    for shard in done_shards(output):
        path = output / STATS_DIR / f"{shard}.json"
        if not path.exists():
            write_json({"shard": shard, **stats_fn(pq.read_table(output / f"{shard}.parquet"))}, path)


def summarise(output: Path, run: dict) -> dict:
    """Totals over every shard's stats (all runs so far) plus this run's numbers -> _summary.json.
    `failed_shards`: the shards this run could not complete (not written; a re-run retries them)."""
    totals, reasons, sums = Counter(), Counter(), Counter()
    for p in sorted((output / STATS_DIR).glob("*.json")):
        s = json.loads(p.read_text())
        totals.update(s.get("status", {}))
        reasons.update(s.get("failures_by_reason", {}))
        sums.update({k: v for k, v in s.items() if isinstance(v, int | float) and k != "written_at"})
    summary = {"output": str(output), "shards": len(done_shards(output)), **dict(sums), "status": dict(totals)}
    summary |= {"failures_by_reason": dict(reasons.most_common()), "failed_shards": run.get("failed_shards", {})}
    summary["last_run"] = run
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
    """Run `job` over the pending shards of `input_dir` (or of `shards`); returns this run's numbers.

    Raises IncompleteJobError (after writing every shard it could and _summary.json) when some shards
    could not be completed; an error of the whole job (e.g. the stage cannot load its model) is raised
    as it is, after the summary."""
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
        refused = f", {stats['refused_samples']} tar samples refused" if stats.get("refused_samples") else ""
        written = output / (shard + ".parquet")
        print(f"[{job.name}] shard {shard}: {stats['rows']} rows {status}{refused} -> {written}", flush=True)

    def initial_rows(shard: str) -> pa.Table | None:
        failures = index_failures(input_dir, shard)
        return job.failure_table(failures) if failures else None

    expected = job.expected_keys or (lambda s: index_keys(input_dir, s))
    hooks = dict(initial_rows=job.initial_rows or initial_rows, on_shard=on_shard)
    sink = ShardCollector(output, shards, expected, job.schema, stats_fn=job.stats_fn, write_fn=job.write_fn, **hooks)
    to_read = [s for s in shards if is_complete(input_dir, s)]
    for shard in sorted(set(shards) - set(to_read)):  # nothing to read: complete from its initial rows, or not
        sink.settle(shard)
    error = None
    if to_read:
        runtime.init_ray(address)
        guarded = type(job.stage_cls.__name__, (GuardedStage,), {})  # named after the stage in Ray's progress
        actor = dict(stage_cls=job.stage_cls, stage_kwargs=job.stage_kwargs, failure_table=job.failure_table)
        threads = runtime.threads_env(actor_threads(job, concurrency))
        env = {"TOKENIZERS_PARALLELISM": "false", **threads, **job.env_vars}
        ds = read_shards(input_dir, to_read, problems=True).map_batches(
            guarded,
            fn_constructor_kwargs={**actor, "schema": job.schema},
            batch_size=batch_size,
            batch_format="pyarrow",
            **actor_pool(job, concurrency),
            num_cpus=job.num_cpus,
            num_gpus=job.num_gpus,
            runtime_env={"env_vars": env},
        )
        # a task that fails (a tar that cannot be opened, a worker that died) costs its shards, not the job:
        # their rows never arrive, the collector names them, the other shards are written
        ds.context.max_errored_blocks = -1
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                sink.add_batch(batch)
                rows += batch.num_rows
                if on_batch:
                    on_batch(batch)
        except Exception as e:  # noqa: BLE001 - recorded in the summary, raised below
            error = e
    if error is None:
        failed = sink.close()
    else:
        sink.count_late_refusals()
        failed = {s: f"not finished: {type(error).__name__}: {error}"[:300] for s in sorted(sink.pending)}
    wall = time.time() - t0
    run = {"shards_written": sink.written, "images": rows, "seconds": round(wall, 2)}
    run |= {"images_per_s": round(rows / wall, 2) if wall and rows else 0.0, "failed_shards": failed}
    if sink.stray_rows:
        run["stray_rows_refused"] = sink.stray_rows
    if error is not None or failed:
        summary = summarise(output, run | {"error": f"{type(error).__name__}: {error}" if error else None})
        if error is not None:
            raise error
        lines = "; ".join(f"{s}: {why}" for s, why in failed.items())
        message = (
            f"{job.name}: {len(failed)} of {len(shards)} shards could not be completed and were not written "
            f"({lines}); {len(sink.written)} were. Fix the cause (see the log above) and re-run: complete shards "
            f"are skipped. Summary: {output / '_summary.json'}"
        )
        raise IncompleteJobError(message, summary, failed)
    return run


def exit_status(e: IncompleteJobError) -> int:
    """The command line's end of a job that could not finish: one message, exit status 1."""
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 1
