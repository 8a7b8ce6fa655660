"""Per-shard output for Ray Data jobs: exactly one file per input shard, written once, atomically.

Ray Data streams rows of many shards through the actor pool at once; the driver collects the
output rows by shard and writes a shard's Parquet file (hidden temporary name, then rename) the
moment all of its rows have arrived. A job killed at any point leaves complete files only; the
re-run skips them and redoes the shards in flight. Memory is bounded by the shards in flight
(Ray Data reads shards roughly in order), not by the job.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa

from unicap.atomic import remove_stale_temporaries, visible_parquet_files, write_json, write_parquet
from unicap.contract.shards import stats_path

STATS_DIR = "_stats"  # "_" prefix: ignored by pandas/pyarrow readers of the output folder


def done_shards(output: str | Path) -> set[str]:
    return {p.stem for p in visible_parquet_files(output)}


def expected_rows(input_dir: str | Path, shards: list[str], field: str = "count") -> dict[str, int]:
    """Rows per input shard from each shard's _stats.json: "count" = every index row (failures
    included), "successes" = the images in the tar."""
    return {s: int(json.loads(stats_path(input_dir, s).read_text())[field]) for s in shards}


class ShardCollector:
    """Accumulates output rows by shard; writes each shard when its expected row count is reached."""

    def __init__(
        self,
        output: str | Path,
        expected: dict[str, int],
        schema: pa.Schema,
        stats_fn: Callable[[pa.Table], dict] | None = None,
        on_shard: Callable[[str, dict], None] | None = None,
        write_fn: Callable[[Path, str, pa.Table], None] | None = None,
    ):
        self.output = Path(output)
        self.output.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.output)
        self.expected = dict(expected)
        self.schema = schema
        self.stats_fn = stats_fn or (lambda t: {"rows": t.num_rows})
        self.on_shard = on_shard
        self.write_fn = write_fn  # custom writer; must write OUTPUT/{shard}.parquet last (the completion mark)
        self.rows: dict[str, dict[str, dict]] = defaultdict(dict)  # shard -> key -> row
        self.written: list[str] = []
        self.t0 = time.time()
        for shard in [s for s, n in self.expected.items() if n == 0]:  # shards with no image at all
            self._write(shard)

    def add_batch(self, batch: pa.Table) -> None:
        for row in batch.to_pylist():
            shard, key = row["shard"], row["key"]
            if shard not in self.expected:
                raise RuntimeError(f"row {key} of shard {shard} that this job was not asked to write")
            self.rows[shard].setdefault(key, row)  # a retried task's duplicate is dropped here
            if len(self.rows[shard]) == self.expected[shard]:
                self._write(shard)

    def _write(self, shard: str) -> None:
        rows = sorted(self.rows.pop(shard, {}).values(), key=lambda r: r["key"])
        table = pa.Table.from_pylist(rows, schema=self.schema)
        if self.write_fn:
            self.write_fn(self.output, shard, table)
        else:
            write_parquet(table, self.output / f"{shard}.parquet")
        stats = {"shard": shard, **self.stats_fn(table), "written_at": time.time()}
        write_json(stats, self.output / STATS_DIR / f"{shard}.json")
        self.written.append(shard)
        del self.expected[shard]
        if self.on_shard:
            self.on_shard(shard, stats)

    def close(self) -> None:
        if self.expected:
            missing = {s: n - len(self.rows.get(s, {})) for s, n in self.expected.items()}
            raise RuntimeError(f"job ended with incomplete shards (rows missing): {missing}")

