"""The pack job's manifest, split by shard: only the manifest's shards are read. The manifest is first split by
shard with DuckDB (bounded memory, spills to a local disk) into OUTPUT/_work/manifest/{shard}.parquet, so the
driver and each actor read one shard's keys, never the 100M-row manifest. The per-shard key files are written
through storage (an actor on another node reads them from where they are); DuckDB's own files stay on the
driver (beside a local output, else in a temporary folder). A manifest's fingerprint is its files' sizes and
mtimes."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from unicap import storage
from unicap.contract import shards
from unicap.storage import Location

SPLIT_LAYOUT = 2  # split.json's layout: 2 = manifest/{shard}.parquet (1 was DuckDB's manifest/shard=S/ folders)
UPLOADS = 8  # key files written at once (on a bucket each is one PUT)


def fingerprint(manifest: str | os.PathLike | Location) -> str:
    """Identity of the manifest file(s): where, size and mtime (a changed manifest is a different pack).
    A local file is named by its resolved path, as before URIs were accepted; a bucket's object by its URI."""
    h = hashlib.sha256()
    for f in manifest_files(manifest):
        info = f.info()
        where = Path(f.path).resolve() if f.is_local else f.uri
        h.update(f"{where}:{info.size}:{info.mtime_ns}".encode())
    return h.hexdigest()


def manifest_files(manifest: str | os.PathLike | Location) -> list[Location]:
    """The manifest's Parquet file(s): the file, or a folder's visible files."""
    loc = storage.resolve(manifest)
    if loc.is_dir():
        return [f for f in loc.files(".parquet") if not f.name.startswith(("_", "."))]
    return [loc]


@contextlib.contextmanager
def _scratch(work: Location) -> Iterator[Path]:
    """DuckDB's local folder: under a local OUTPUT/_work (its disk), else a temporary folder of this machine."""
    if work.is_local:
        scratch = work.local_path / "duckdb_tmp"
        scratch.mkdir(parents=True, exist_ok=True)
        try:
            yield scratch
        finally:
            work.fs.delete_dir(str(scratch))
        return
    with tempfile.TemporaryDirectory(prefix="unicap-pack-") as scratch:
        yield Path(scratch)


def _manifest_view(con, files: list[Location]) -> None:
    """The view `manifest` (key, shard) over the manifest files: DuckDB's reader on a local disk, an Arrow
    dataset on the files' filesystem otherwise. Paths never become SQL text."""
    if all(f.is_local for f in files):
        con.read_parquet([f.path for f in files]).project("key, shard").create_view("manifest")
        return
    schema = pa.schema([("key", pa.string()), ("shard", pa.string())])
    dataset = pads.dataset([f.path for f in files], schema=schema, filesystem=files[0].fs, format="parquet")
    con.register("manifest", dataset)


def split_manifest(manifest: str | os.PathLike | Location, work: Location, fp: str) -> dict[str, int]:
    """Rows per shard, and work/manifest/{shard}.parquet with each shard's keys, written through storage (DuckDB
    sorts out of core on a local disk; one shard's keys in memory at a time)."""
    import duckdb

    work, done = storage.resolve(work), storage.resolve(work).join("split.json")
    if done.exists():
        state = done.read_json()
        if state["fingerprint"] == fp and state.get("layout") == SPLIT_LAYOUT:
            return state["rows_per_shard"]
    with contextlib.suppress(FileNotFoundError):
        work.fs.delete_dir_contents(work.join("manifest").path, missing_dir_ok=True)
    work.mkdir()
    with _scratch(work) as scratch:
        con = duckdb.connect()
        con.execute("SET memory_limit = ?", ["2GB"])
        con.execute("SET temp_directory = ?", [str(scratch / "spill")])
        _manifest_view(con, manifest_files(manifest))
        counts = dict(con.execute("SELECT shard, count(*) FROM manifest GROUP BY shard ORDER BY shard").fetchall())
        bad = [s for s in counts if not shards.shard_name_ok(s)]
        if bad:
            con.close()
            raise ValueError(
                f"{storage.resolve(manifest)}: rows name shards {bad[:5]!r}, which are not shard names (a file "
                "name without '/' and not starting with '.'): the manifest is not unicap stages output"
            )
        by_shard = scratch / "by_shard.parquet"
        con.execute(
            "COPY (SELECT key, shard FROM manifest ORDER BY shard, key) TO $path (FORMAT PARQUET)",
            {"path": str(by_shard)},
        )
        con.close()
        _write_key_files(by_shard, work.join("manifest"))
    done.write_json({"fingerprint": fp, "layout": SPLIT_LAYOUT, "rows_per_shard": counts})
    return counts


def _write_key_files(by_shard: Path, folder: Location) -> None:
    """A local Parquet file sorted by shard -> folder/{shard}.parquet (column key), one shard at a time,
    UPLOADS writes in flight."""

    def shard_runs() -> Iterator[tuple[str, pa.Table]]:
        current, parts = None, []
        for batch in pq.ParquetFile(by_shard).iter_batches(batch_size=1 << 16):
            shard = batch.column("shard")
            changes = pc.not_equal(shard.slice(1), shard.slice(0, len(shard) - 1)).to_numpy(zero_copy_only=False)
            bounds = [0, *(np.flatnonzero(changes) + 1).tolist(), len(shard)]
            for start, end in zip(bounds[:-1], bounds[1:], strict=True):
                name = shard[start].as_py()
                if current is not None and name != current:  # a shard's run may go on in the next batch
                    yield current, pa.Table.from_batches(parts).select(["key"])
                    parts = []
                current = name
                parts.append(batch.slice(start, end - start))
        if parts:
            yield current, pa.Table.from_batches(parts).select(["key"])

    with ThreadPoolExecutor(UPLOADS) as pool:
        in_flight = []
        for shard, keys in shard_runs():
            in_flight.append(pool.submit(folder.join(f"{shard}.parquet").write_parquet, keys))
            if len(in_flight) >= 4 * UPLOADS:
                in_flight.pop(0).result()
        for f in in_flight:
            f.result()


def manifest_keys(work: str | os.PathLike | Location, shard: str) -> list[str]:
    """The manifest's keys of one shard (split_manifest's file), [] for a shard the manifest does not name."""
    try:
        table = storage.resolve(work).join("manifest", f"{shard}.parquet").read_parquet(columns=["key"])
    except FileNotFoundError:
        return []
    return table.column("key").to_pylist()


def shards_dir_of(manifest: str | os.PathLike | Location) -> str:
    """The image shard folder (a path or a URI), from the manifest's location column (tar paths, when
    stages had --shards)."""
    with manifest_files(manifest)[0].open_input() as f:
        first = next(pq.ParquetFile(f).iter_batches(batch_size=1, columns=["location"]), None)
    loc = first.column("location").to_pylist() if first is not None else []
    if not loc or not str(loc[0]).endswith(".tar"):
        raise ValueError("the manifest's location column holds shard names, not tar paths: give --shards DIR")
    return str(loc[0]).rpartition("/")[0]
