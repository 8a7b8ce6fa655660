"""Per-shard output for Ray Data jobs: exactly one file per input shard, written once, atomically.

Ray Data streams rows of many shards through the actor pool at once; the driver collects the
output rows by shard and writes a shard's Parquet file (hidden temporary name, then rename) the
moment every key it expects has arrived. A shard is complete against its key SET (the index's keys,
or the job's own), never a row count: a row whose key the shard does not expect is refused and
counted in the shard's stats (it belongs to no input row), a second row of a key is dropped. A job
killed at any point leaves complete files only; the re-run skips them and redoes the shards in flight.

Memory is bounded by the shards in flight (Ray Data reads shards roughly in order), not by the job:
a shard's expected keys and initial rows are loaded when its first row arrives, and dropped when
it is written.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from unicap.atomic import remove_stale_temporaries, visible_parquet_files, write_json, write_parquet
from unicap.contract.shards import shard_name_ok

STATS_DIR = "_stats"  # "_" prefix: ignored by pandas/pyarrow readers of the output folder


def _written_by_a_shard_job(rel: str) -> bool:
    """The files a per-shard job writes (relative to its output): {shard}.parquet / .tar, _stats/{shard}.json,
    _summary.json. Only temporaries of these are cleaned up after a kill; a user's look-alike is left alone."""
    parts = rel.split("/")
    if len(parts) == 2:
        return parts[0] == STATS_DIR and parts[1].endswith(".json") and shard_name_ok(parts[1][: -len(".json")])
    name = parts[0]
    stem, _, ext = name.rpartition(".")
    return name == "_summary.json" or (ext in ("parquet", "tar") and shard_name_ok(stem))


EXAMPLES = 5  # keys named per problem in stats and messages


def done_shards(output: str | Path) -> set[str]:
    return {p.stem for p in visible_parquet_files(output)}


def _examples(kept: list[str], new: list[str]) -> list[str]:
    """The EXAMPLES smallest distinct keys of both (bounded, and the same whatever the arrival order)."""
    return sorted({*kept, *new})[:EXAMPLES]


@dataclass
class _OpenShard:
    keys: frozenset[str]  # every key the shard's output must hold
    rows: dict[str, dict] = field(default_factory=dict)  # key -> row
    refused: int = 0  # rows whose key the shard does not expect
    refused_examples: list[str] = field(default_factory=list)
    duplicates: int = 0  # second rows of a key (a retried task's, or a second sample in a tar)


class ShardCollector:
    """Accumulates output rows by shard; writes each shard when all of its expected keys are in.

    keys_of(shard): the keys the shard's output holds (loaded when the shard is first touched).
    initial_rows(shard): rows the driver adds itself when the shard is first touched (e.g. the index's
    failures, which never reach an actor). settle(shard) says the input of a shard has ended: written
    if complete, else recorded in `failed` with the keys that never arrived."""

    def __init__(
        self,
        output: str | Path,
        shards: list[str],
        keys_of: Callable[[str], set[str] | frozenset[str]],
        schema: pa.Schema,
        initial_rows: Callable[[str], pa.Table | None] | None = None,
        stats_fn: Callable[[pa.Table], dict] | None = None,
        on_shard: Callable[[str, dict], None] | None = None,
        write_fn: Callable[[Path, str, pa.Table], None] | None = None,
    ):
        bad = [s for s in shards if not shard_name_ok(s)]
        if bad:
            raise ValueError(f"not shard names (outputs are named after them): {bad[:5]!r}")
        self.output = Path(output)
        self.output.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.output, _written_by_a_shard_job)
        self.pending = set(shards)  # neither written nor failed yet
        self.keys_of = keys_of
        self.initial_rows = initial_rows
        self.schema = schema
        self.stats_fn = stats_fn or (lambda t: {"rows": t.num_rows})
        self.on_shard = on_shard
        self.write_fn = write_fn  # custom writer; must write OUTPUT/{shard}.parquet last (the completion mark)
        self.open: dict[str, _OpenShard] = {}
        self.written: list[str] = []
        self.failed: dict[str, str] = {}  # shard -> why it was not written
        self.stats: dict[str, dict] = {}  # shard -> its stats, for the shards written in this run
        self.late: dict[str, list] = {}  # shard -> [count, examples] refused after it was written (added in close)
        self.stray_rows = 0  # rows of shards this collector was not asked for (refused)
        self.t0 = time.time()

    def add_batch(self, batch: pa.Table) -> None:
        for row in batch.to_pylist():
            self._add(row)

    def _touch(self, shard: str) -> _OpenShard:
        """The shard's state, loading its expected keys and initial rows on first use."""
        if shard not in self.open:
            state = self.open[shard] = _OpenShard(frozenset(self.keys_of(shard)))
            first = self.initial_rows(shard) if self.initial_rows else None
            for row in first.to_pylist() if first is not None else ():
                self._accept(state, row)
        return self.open[shard]

    def _accept(self, state: _OpenShard, row: dict) -> None:
        key = row["key"]
        if key not in state.keys:
            state.refused += 1
            state.refused_examples = _examples(state.refused_examples, [key])
        elif key in state.rows:
            state.duplicates += 1
        else:
            state.rows[key] = row

    def _add(self, row: dict) -> None:
        shard = row["shard"]
        if shard not in self.pending:
            if shard in self.stats:  # a sample after the shard was complete: refused, counted at the end
                late = self.late.setdefault(shard, [0, []])
                late[0], late[1] = late[0] + 1, _examples(late[1], [row["key"]])
            else:
                self.stray_rows += 1  # a failed shard's, or one this job was not asked for
            return
        state = self._touch_or_fail(shard)
        if state is None:
            return
        self._accept(state, row)
        if len(state.rows) == len(state.keys):
            self._write(shard)

    def _touch_or_fail(self, shard: str) -> _OpenShard | None:
        """The shard's state; None when its keys or initial rows cannot be read (an unreadable index):
        that shard fails as a whole, the others go on."""
        try:
            return self._touch(shard)
        except Exception as e:  # noqa: BLE001 - one shard's broken input is that shard's failure
            self.open.pop(shard, None)
            self.pending.discard(shard)
            self.failed[shard] = f"its expected keys could not be read: {type(e).__name__}: {e}"[:500]
            return None

    def settle(self, shard: str) -> bool:
        """The input of `shard` has ended: write it if complete, else record why not. True if written."""
        if shard not in self.pending:
            return shard in self.written
        state = self._touch_or_fail(shard)
        if state is None:
            return False
        if len(state.rows) == len(state.keys):
            self._write(shard)
            return True
        missing = sorted(state.keys - state.rows.keys())
        examples = ", ".join(missing[:EXAMPLES])
        lost = f"{len(missing)} of {len(state.keys)} rows never arrived (e.g. {examples})"
        self.failed[shard] = f"{lost}: their read or processing failed"
        self.pending.discard(shard)
        del self.open[shard]
        return False

    def _write(self, shard: str) -> None:
        state = self.open.pop(shard)
        rows = sorted(state.rows.values(), key=lambda r: r["key"])
        table = pa.Table.from_pylist(rows, schema=self.schema)
        if self.write_fn:
            self.write_fn(self.output, shard, table)
        else:
            write_parquet(table, self.output / f"{shard}.parquet")
        stats = {"shard": shard, **self.stats_fn(table), "refused_samples": state.refused}
        stats |= {"duplicate_rows_dropped": state.duplicates, "written_at": time.time()}
        if state.refused:
            stats["refused_examples"] = state.refused_examples
        write_json(stats, self.output / STATS_DIR / f"{shard}.json")
        self.stats[shard] = stats
        self.written.append(shard)
        self.pending.discard(shard)
        if self.on_shard:
            self.on_shard(shard, stats)

    def count_late_refusals(self) -> None:
        """Add the samples refused after their shard was written to its stats file (the Parquet stays)."""
        for shard, (count, keys) in sorted(self.late.items()):
            stats = self.stats[shard]
            stats["refused_samples"] += count
            stats["refused_examples"] = _examples(stats.get("refused_examples", []), keys)
            write_json(stats, self.output / STATS_DIR / f"{shard}.json")
        self.late.clear()

    def close(self) -> dict[str, str]:
        """End of the whole input: settle every shard still pending; returns the failed ones."""
        for shard in sorted(self.pending):
            self.settle(shard)
        self.count_late_refusals()
        return self.failed
