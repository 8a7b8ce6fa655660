"""Per-shard output of Ray Data jobs: exactly one file per input shard, complete against its key set, written
once by the worker that produced it.

A worker holds one shard's output rows (Arrow tables, never per-row Python objects), keeps the rows whose key
the shard expects (the index's keys, or the job's own) and the first row of each key, and writes the shard's
Parquet file only when every expected key is there: complete against its key SET, never a row count. A row
whose key the shard does not expect is refused and counted in the shard's stats (it belongs to no input
row); a second row of a key is dropped and counted. The output goes straight to the output filesystem
(unicap.storage: a file that exists is complete, on a local disk and in a bucket), the data file first, its
stats file after; a kill between them is repaired from the data file by the next run, which skips every
shard whose data file exists and redoes the rest.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import pyarrow as pa
import pyarrow.compute as pc

from unicap import storage
from unicap.atomic import remove_stale_temporaries
from unicap.contract.shards import shard_name_ok
from unicap.storage import Location

STATS_DIR = "_stats"  # "_" prefix: ignored by pandas/pyarrow readers of the output folder
EXAMPLES = 5  # keys named per problem in stats and messages


class IncompleteShard(RuntimeError):
    """Some of the shard's expected keys never arrived: the shard is not written."""


def _written_by_a_shard_job(rel: str) -> bool:
    """The files a per-shard job writes (relative to its output): {shard}.parquet / .tar, _stats/{shard}.json,
    _summary.json. Only temporaries of these are cleaned up after a kill; a user's look-alike is left alone."""
    parts = rel.split("/")
    if len(parts) == 2:
        return parts[0] == STATS_DIR and parts[1].endswith(".json") and shard_name_ok(parts[1][: -len(".json")])
    name = parts[0]
    stem, _, ext = name.rpartition(".")
    return name == "_summary.json" or (ext in ("parquet", "tar") and shard_name_ok(stem))


def prepare_output(output: Location) -> None:
    """Create the output folder; on a local disk, remove the temporaries a killed run left (object stores have
    none: an upload that dies leaves nothing visible)."""
    output.mkdir()
    if output.is_local:
        remove_stale_temporaries(output.local_path, _written_by_a_shard_job)


def done_shards(output: str | os.PathLike | Location) -> set[str]:
    """The shards whose output exists (one listing): a file that exists is complete."""
    names = (f.name for f in storage.resolve(output).files(".parquet"))
    return {n[: -len(".parquet")] for n in names if not n.startswith(("_", "."))}


def _examples(keys: pa.Array) -> list[str]:
    """The EXAMPLES smallest distinct keys (bounded, and the same whatever the arrival order)."""
    return sorted(pc.unique(keys).to_pylist())[:EXAMPLES]


def complete_table(table: pa.Table, expected: pa.Array, schema: pa.Schema) -> tuple[pa.Table, dict]:
    """The shard's output: one row per expected key (the first that arrived), sorted by key, in `schema`.

    Returns it with the shard's accounting (refused_samples, refused_examples, duplicate_rows_dropped).
    Raises IncompleteShard naming the keys that never arrived."""
    keys = table.column("key")
    wanted = pc.is_in(keys, value_set=expected)
    refused = table.num_rows - pc.sum(wanted).as_py() if table.num_rows else 0
    stray = pc.filter(keys, pc.invert(wanted)) if refused else pa.array([], pa.string())
    kept = table.filter(wanted)
    order = kept.append_column("__row", pa.array(range(kept.num_rows), pa.int64()))
    first = order.group_by("key", use_threads=False).aggregate([("__row", "min")]).column("__row_min")
    duplicates = kept.num_rows - len(first)
    kept = kept.take(first).sort_by("key")
    if kept.num_rows != len(expected):
        missing = pc.filter(expected, pc.invert(pc.is_in(expected, value_set=kept.column("key"))))
        examples = ", ".join(_examples(missing))
        raise IncompleteShard(f"{len(missing)} of {len(expected)} rows never arrived (e.g. {examples})")
    accounting = {"refused_samples": refused, "duplicate_rows_dropped": duplicates}
    if refused:
        accounting["refused_examples"] = _examples(stray)
    return kept.select(schema.names).cast(schema), accounting


def write_shard_output(
    output: Location,
    shard: str,
    table: pa.Table,
    accounting: dict,
    stats_fn: Callable[[pa.Table], dict],
    write_fn: Callable[[Location, str, pa.Table], None] | None = None,
) -> dict:
    """The shard's data file (write_fn's, which writes OUTPUT/{shard}.parquet last), then its stats file."""
    if write_fn:
        write_fn(output, shard, table)
    else:
        output.join(f"{shard}.parquet").write_parquet(table)
    stats = {"shard": shard, **stats_fn(table), **accounting, "written_at": time.time()}
    output.join(STATS_DIR, f"{shard}.json").write_json(stats)
    return stats
