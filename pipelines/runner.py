"""The shared driver of every per-shard Ray Data job (caption, score, pack): the workers write, the driver schedules.

    pending shards (in the input, absent from the output)
      -> Ray Data: one row per shard -> map_batches(ShardWorker(job's stage), actor pool)
         each call: read the shard against its index (ShardFolder, local or a bucket), run the stage on its
         batches, keep one row per expected key, write {shard}.parquet and _stats/{shard}.json to the output
      -> driver: one small stats row per shard; _summary.json

No image row reaches the driver: its cost is per shard, not per row, and every output goes from the worker
that produced it straight to the output filesystem (unicap.storage), as img2dataset's workers do.

Every input row comes out exactly once, and one bad item costs only itself:
- index rows that never became images (download or decode failures at ingest) are turned into the
  job's own failure rows by `job.failure_table`;
- items the reader could not deliver (missing from a truncated tar, an invalid {key}.json, ...) carry
  a `read_error`: GuardedStage makes them failure rows the same way, without calling the stage;
- an exception in the stage is retried item by item; an item that still raises is its own failure
  row (`processing_error: ...`), the rest of the batch goes on;
- tar samples that belong to no input row (a key the index lacks, a second sample of a key) are refused
  and counted in the shard's stats (refused_samples).
A shard that fails as a whole (its tar cannot be opened, its index cannot be read, a worker died) is not
written: the other shards go on, and the job ends with IncompleteJobError naming it (exit status 1 on the
command line), after writing _summary.json. Re-running redoes exactly the shards that are not written.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from datagen.shards import ShardFolder
from pipelines.sink import (
    STATS_DIR,
    IncompleteShard,
    complete_table,
    done_shards,
    prepare_output,
    write_shard_output,
)
from unicap import runtime, storage
from unicap.contract.shards import READ_ERROR
from unicap.storage import Location


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
    # workers: for the index's failures, items the reader could not deliver, items that raised.
    failure_table: Callable[[list[dict]], pa.Table]
    write_fn: Callable[[Location, str, pa.Table], None] | None = None
    num_cpus: float = 0.5
    num_gpus: float = 0
    env_vars: dict = field(default_factory=dict)
    # OpenMP/torch threads per actor. Ray sets OMP_NUM_THREADS to an actor's num_cpus (1 for a
    # fractional claim), which starves CPU inference. None: CPU actors (num_gpus 0) get their share
    # of the cores (runtime.cpu_threads_per_actor), GPU actors keep Ray's choice.
    threads: int | None = None
    # Shards one actor works on at once, each on a thread of its own (Ray's max_concurrency): with 2, one
    # shard's CPU work (read, decode, resize: C code that releases the GIL) overlaps the engine's run on the
    # other. A stage that takes more than 1 must be thread-safe (the caption stage serialises its engine calls).
    max_concurrency: int = 1
    # Jobs whose output rows are not the input index's rows (pack: a stage manifest's rows of a shard):
    # the keys each shard will output (default: its index keys), and rows the worker adds itself
    # (default: failure_table(index failures)); the stage drops rows it does not own. Both run in the
    # worker that has the shard, so they must pickle (no local paths on a cluster with no shared disk).
    expected_keys: Callable[[str], pa.Array | set[str]] | None = None
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


def failure_record(row: dict, error: str) -> dict:
    """A reader row (or part of one) -> the failure record every job's failure_table takes."""
    where = {"key": row["key"], "shard": row["shard"], "sha256": row.get("sha256"), "source": row.get("source")}
    return {**where, "original_caption": row.get("original_caption"), "error": error[:2000]}


def conform(parts: list[pa.Table], schema: pa.Schema) -> pa.Table:
    """Tables of one job's rows (the stage's, failure rows) -> one table in `schema`, column by column."""
    parts = [p.select(schema.names).cast(schema) for p in parts if p.num_rows]
    return pa.concat_tables(parts) if parts else schema.empty_table()


class GuardedStage:
    """A job's stage, guarded: one bad item costs only itself.

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
            problems = batch.filter(bad).drop_columns(["image"]).to_pylist()  # the problem rows only
            if problems:
                parts.append(self.failure_table([failure_record(r, r[READ_ERROR]) for r in problems]))
            batch = batch.filter(pc.invert(bad)).drop_columns([READ_ERROR])
        if batch.num_rows:
            parts += self._process(batch)
        return conform(parts, self.schema)

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


RESULT_SCHEMA = pa.schema([("shard", pa.string()), ("stats", pa.string()), ("error", pa.string())])


class ShardWorker:
    """Ray Data actor: each call is one shard (a one-row batch), read, processed and written here.
    Returns one row per shard: its stats (JSON) or why it could not be completed."""

    def __init__(self, job: ShardJob, source: ShardFolder, output: Location, batch_size: int):
        self.job, self.source, self.output, self.batch_size = job, source, output, batch_size
        self.stage = GuardedStage(job.stage_cls, job.stage_kwargs, job.failure_table, job.schema)

    def __call__(self, batch: pa.Table) -> pa.Table:
        results = [self._one(shard) for shard in batch.column("shard").to_pylist()]
        return pa.Table.from_pylist(results, schema=RESULT_SCHEMA)

    def _one(self, shard: str) -> dict:
        try:
            return {"shard": shard, "stats": json.dumps(self.run_shard(shard)), "error": None}
        except Exception as e:  # noqa: BLE001 - one shard's failure is that shard's, the job goes on
            print(f"[{self.job.name}] shard {shard}:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
            return {"shard": shard, "stats": None, "error": str(e)[:500]}

    def run_shard(self, shard: str) -> dict:
        job, source = self.job, self.source
        try:
            expected = job.expected_keys(shard) if job.expected_keys else source.index_keys(shard)
            if not isinstance(expected, pa.Array):
                expected = pa.array(sorted(expected), pa.string())
            index = None if job.initial_rows else source.index(shard)
            first = job.initial_rows(shard) if job.initial_rows else job.failure_table(source.failures(shard, index))
        except Exception as e:
            raise RuntimeError(f"its expected keys could not be read: {type(e).__name__}: {e}") from e
        parts = [first] if first is not None else []
        try:
            if job.expected_keys is None or source.is_complete(shard):
                read = source.iter_shard(shard, problems=True, batch_rows=self.batch_size, index=index)
                parts += [self.stage(b) for b in read]
        except OSError as e:  # the tar cannot be read at all: the keys it held never arrive
            error = f"the shard could not be read: {type(e).__name__}: {e}"
        else:
            error = None
        try:
            table, accounting = complete_table(conform(parts, job.schema), expected, job.schema)
        except IncompleteShard as e:
            raise IncompleteShard(f"{e}: {error or 'their read or processing failed'}") from None
        return write_shard_output(self.output, shard, table, accounting, job.stats_fn, job.write_fn)


def _sums(stats) -> Counter:
    """The numeric fields of shard stats, summed (counts and totals; the write time is not one)."""
    sums = Counter()
    for s in stats:
        sums.update({k: v for k, v in s.items() if isinstance(v, int | float) and k != "written_at"})
    return sums


def repair_stats(output: Location, stats_fn: Callable[[pa.Table], dict], done: set[str]) -> None:
    """A kill between a shard's Parquet and its stats file: rebuild the stats from the Parquet."""
    have = {f.name[: -len(".json")] for f in output.join(STATS_DIR).files(".json")}
    for shard in sorted(done - have):
        table = output.join(f"{shard}.parquet").read_parquet()
        output.join(STATS_DIR, f"{shard}.json").write_json({"shard": shard, **stats_fn(table)})


def summarise(output: str | os.PathLike | Location, run: dict) -> dict:
    """Totals over every shard's stats (all runs so far) plus this run's numbers -> _summary.json.
    `failed_shards`: the shards this run could not complete (not written; a re-run retries them)."""
    output = storage.resolve(output)
    totals, reasons, every = Counter(), Counter(), [f.read_json() for f in output.join(STATS_DIR).files(".json")]
    for s in every:
        totals.update(s.get("status", {}))
        reasons.update(s.get("failures_by_reason", {}))
    sums = _sums(every)
    summary = {"output": output.uri, "shards": len(done_shards(output)), **dict(sums), "status": dict(totals)}
    summary |= {"failures_by_reason": dict(reasons.most_common()), "failed_shards": run.get("failed_shards", {})}
    summary["last_run"] = run
    output.join("_summary.json").write_json(summary)
    return summary


def _schedule(job: ShardJob, source: ShardFolder, output: Location, shards: list[str], opts: dict):
    """The Ray Dataset of per-shard results: one row in, one shard's stats (or failure) out."""
    import ray

    runtime.init_ray(opts["address"])
    worker = type(job.stage_cls.__name__, (ShardWorker,), {})  # named after the stage in Ray's progress
    threads = runtime.threads_env(actor_threads(job, opts["concurrency"]))
    env = {"TOKENIZERS_PARALLELISM": "false", **threads, **job.env_vars}
    ds = ray.data.from_items([{"shard": s} for s in shards], override_num_blocks=len(shards)).map_batches(
        worker,
        fn_constructor_kwargs=dict(job=job, source=source, output=output, batch_size=opts["batch_size"]),
        batch_size=1,
        batch_format="pyarrow",
        **actor_pool(job, opts["concurrency"]),
        num_cpus=job.num_cpus,
        num_gpus=job.num_gpus,
        runtime_env={"env_vars": env},
    )
    # a task that dies (a worker killed) costs its shard, not the job: its result never arrives, the
    # driver names it, the other shards are written
    ds.context.max_errored_blocks = -1
    # the per-shard lines are the job's progress: Ray Data's own progress logging costs the driver ~40% of its
    # CPU on a long job (bench/bench_scale.py's note), every few seconds, whatever the rows
    ds.context.enable_progress_bars = False
    ds.context.print_on_execution_start = False
    return ds


def run_sharded(
    job: ShardJob,
    input_dir: str | os.PathLike | Location,
    output: str | os.PathLike | Location,
    *,
    batch_size: int = 16,
    concurrency: int = 1,
    address: str | None = None,
    limit_shards: int | None = None,
    shards: list[str] | None = None,
) -> dict:
    """Run `job` over the pending shards of `input_dir` (or of `shards`); returns this run's numbers
    (`this_run`: the numeric stats of the shards written in this run, summed).

    Raises IncompleteJobError (after writing every shard it could and _summary.json) when some shards
    could not be completed; an error of the whole job (e.g. the stage cannot load its model) is raised
    as it is, after the summary."""
    source, output = ShardFolder(input_dir), storage.resolve(output)
    prepare_output(output)
    done = done_shards(output)
    repair_stats(output, job.stats_fn, done)
    shards = [s for s in (source.list() if shards is None else shards) if s not in done]
    if limit_shards is not None:
        shards = shards[:limit_shards]
    t0, written, failed, stats, error = time.time(), [], {}, {}, None
    if shards:
        opts = dict(batch_size=batch_size, concurrency=concurrency, address=address)
        try:
            for r in _schedule(job, source, output, shards, opts).iter_rows():
                if r["error"] is not None:
                    failed[r["shard"]] = r["error"]
                    continue
                stats[r["shard"]] = s = json.loads(r["stats"])
                written.append(r["shard"])
                refused = f", {s['refused_samples']} tar samples refused" if s.get("refused_samples") else ""
                where = output.join(f"{r['shard']}.parquet")
                line = f"[{job.name}] shard {r['shard']}: {s['rows']} rows {s.get('status', {})}{refused} -> {where}"
                print(line, flush=True)
        except Exception as e:  # noqa: BLE001 - recorded in the summary, raised below
            error = e
    reason = f"not finished: {type(error).__name__}: {error}"[:300] if error else "not finished: its worker died"
    failed |= {s: reason for s in shards if s not in stats and s not in failed}
    if error is None:
        failed = {s: failed[s] for s in sorted(failed)}
    wall = time.time() - t0
    rows = sum(s["rows"] for s in stats.values())
    run = {"shards_written": written, "images": rows, "seconds": round(wall, 2)}
    run |= {"images_per_s": round(rows / wall, 2) if wall and rows else 0.0, "failed_shards": failed}
    run["this_run"] = {k: v for k, v in _sums(stats.values()).items() if k != "rows"}  # e.g. output_tokens
    if error is not None or failed:
        summary = summarise(output, run | {"error": f"{type(error).__name__}: {error}" if error else None})
        if error is not None:
            raise error
        lines = "; ".join(f"{s}: {why}" for s, why in failed.items())
        message = (
            f"{job.name}: {len(failed)} of {len(shards)} shards could not be completed and were not written "
            f"({lines}); {len(written)} were. Fix the cause (see the log above) and re-run: complete shards "
            f"are skipped. Summary: {output.join('_summary.json')}"
        )
        raise IncompleteJobError(message, summary, failed)
    return run


def exit_status(e: IncompleteJobError) -> int:
    """The command line's end of a job that could not finish: one message, exit status 1."""
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 1
