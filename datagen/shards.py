"""Writing and reading image shards, shared by URL ingest (img2dataset), folder ingest and the synthetic set.

The format (tar + Parquet index + stats file written last) is the contract unicap.contract.shards:

    DIR/00000.tar          members {key}.{jpg|png|webp|...}, {key}.txt (caption), {key}.json (metadata)
    DIR/00000.parquet      the index: one row per input item, failures included (status, error_message)
    DIR/00000_stats.json   counts per status; written LAST, so its presence marks the shard complete

DIR is a local folder or a URI (unicap.storage): `ShardFolder(DIR)` is the one object every job uses for it
(list, complete?, index, failures, read), and it pickles, so Ray workers read their own shards. Readers for
users: `read_index(DIR)` (pandas) and `read_shards(DIR)` (Ray Data: key, shard, image bytes, metadata). A tar
is read against its index (datagen.shard_reader): a truncated tar, a key the index lacks, an invalid
{key}.json each cost their own items, never the shard.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from datagen.shard_reader import iter_tar
from unicap import storage
from unicap.contract import caption as caption_record
from unicap.contract.shards import INDEX_SCHEMA, STATS_SUFFIX, SUCCESS
from unicap.storage import Location

READ_BUFFER = 16 << 20  # bytes a shard's tar is read by


def shard_name(shard_id: int) -> str:
    return f"{shard_id:05d}"


class ShardFolder:
    """A folder of image shards, local or in a bucket: what it holds, and each shard's index, failures and rows."""

    def __init__(self, where: str | os.PathLike | Location):
        self.loc = storage.resolve(where)

    def __repr__(self) -> str:
        return f"ShardFolder({self.loc.uri!r})"

    @property
    def uri(self) -> str:
        return self.loc.uri

    def tar(self, shard: str) -> Location:
        return self.loc.join(f"{shard}.tar")

    def index_file(self, shard: str) -> Location:
        return self.loc.join(f"{shard}.parquet")

    def stats_file(self, shard: str) -> Location:
        return self.loc.join(f"{shard}{STATS_SUFFIX}")

    def list(self) -> list[str]:
        """Names of the complete shards, sorted (one listing of the folder)."""
        return sorted(f.name[: -len(STATS_SUFFIX)] for f in self.loc.files(STATS_SUFFIX))

    def is_complete(self, shard: str) -> bool:
        return self.stats_file(shard).exists()

    def index(self, shard: str, columns: list[str] | None = None) -> pa.Table:
        return self.index_file(shard).read_parquet(columns=columns)

    def index_keys(self, shard: str) -> pa.Array:
        """Every key of the shard's index (failures included): what a job's output of it must hold."""
        return self.index(shard, columns=["key"]).column("key").combine_chunks()

    def failures(self, shard: str, index: pa.Table | None = None) -> list[dict]:
        """The index rows that are not images, as failure records: key, shard, sha256, source, original_caption,
        error (a known failure reason, else `download_failed: ...`)."""
        index = self.index(shard) if index is None else index
        failed = index.filter(pc.not_equal(index.column("status"), SUCCESS))
        out = []
        for r in failed.to_pylist():  # failures only: a handful of rows per shard
            msg = r.get("error_message") or r["status"]
            known = caption_record.error_reason(msg) in caption_record.ERROR_REASONS
            where = {"key": r["key"], "shard": shard, "sha256": r.get("sha256"), "source": r.get("url")}
            error = msg if known else f"download_failed: {msg}"
            out.append({**where, "original_caption": r.get("caption"), "error": error})
        return out

    def iter_shard(
        self,
        shard: str,
        *,
        problems: bool = False,
        batch_rows: int = 64,
        batch_bytes: int = 64 << 20,
        index: pa.Table | None = None,
    ) -> Iterator[pa.Table]:
        """One shard, read against its index (see datagen.shard_reader.iter_tar); the tar is streamed.
        Opening the tar may raise OSError: a shard that cannot be read at all is its job's failure."""
        index = self.index(shard) if index is None else index
        tar = self.tar(shard)
        # buffered: one ranged GET per READ_BUFFER on an object store, not one per tar block
        stream = tar.fs.open_input_stream(tar.path, buffer_size=READ_BUFFER)
        kwargs = dict(problems=problems, batch_rows=batch_rows, batch_bytes=batch_bytes)
        yield from iter_tar(index, stream, f"{shard}.tar", shard, **kwargs)


def is_complete(directory: str | os.PathLike | Location, shard: str) -> bool:
    return ShardFolder(directory).is_complete(shard)


def list_shards(directory: str | os.PathLike | Location) -> list[str]:
    """Names of the complete shards in a folder, sorted."""
    return ShardFolder(directory).list()


def iter_shard(directory: str | os.PathLike | Location, shard: str, **kwargs) -> Iterator[pa.Table]:
    return ShardFolder(directory).iter_shard(shard, **kwargs)


@dataclass
class ShardItem:
    """One input item of a shard: image bytes on success, an error message otherwise."""

    key: str
    source: str
    caption: str | None = None
    image: bytes | None = None
    ext: str = "jpg"
    width: int | None = None
    height: int | None = None
    sha256: str | None = None
    error: str | None = None  # None = success
    meta: dict | None = None  # extra fields for {key}.json


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # deterministic bytes: same input, same tar
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _index_row(it: ShardItem, status: str) -> dict:
    size = {"width": it.width, "height": it.height, "original_width": it.width, "original_height": it.height}
    where = {"key": it.key, "url": it.source, "caption": it.caption}
    return {**where, "status": status, "error_message": it.error, **size, "sha256": it.sha256}


def write_shard(directory: str | os.PathLike | Location, shard: str, items: Iterable[ShardItem]) -> dict:
    """Write one complete shard (tar, index, stats), each file whole (storage: a file that exists is complete),
    stats last."""
    folder = ShardFolder(directory)
    folder.loc.mkdir()
    rows, counts, buffer = [], Counter(), io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for it in items:
            if "." in it.key or "/" in it.key:
                raise ValueError(f"shard keys may not contain '.' or '/': {it.key!r}")
            status = SUCCESS if it.error is None else "failed_to_download"
            counts[status] += 1
            rows.append(_index_row(it, status))
            if it.error is not None:
                continue
            meta = {k: v for k, v in rows[-1].items() if k != "error_message"} | (it.meta or {})
            _add_member(tar, f"{it.key}.{it.ext}", it.image)
            _add_member(tar, f"{it.key}.txt", (it.caption or "").encode())
            _add_member(tar, f"{it.key}.json", json.dumps(meta, sort_keys=True).encode())
    folder.tar(shard).write_bytes(buffer.getvalue())
    folder.index_file(shard).write_parquet(pa.Table.from_pylist(rows, schema=INDEX_SCHEMA))
    stats = {"shard": shard, "count": len(rows), "successes": counts[SUCCESS], "status": dict(counts)}
    folder.stats_file(shard).write_json(stats)
    return stats


def read_index(directory: str | os.PathLike | Location) -> pd.DataFrame:
    """Every input row of every complete shard (failures included), with a `shard` column."""
    folder = ShardFolder(directory)
    frames = []
    for shard in folder.list():
        df = folder.index(shard).to_pandas()
        df["shard"] = shard
        frames.append(df)
    if not frames:
        return pd.DataFrame(columns=[*INDEX_SCHEMA.names, "shard"])
    return pd.concat(frames, ignore_index=True)


def _read_shard_batches(batch: pa.Table, folder: ShardFolder, problems: bool) -> Iterator[pa.Table]:
    for shard in batch.column("shard").to_pylist():
        yield from folder.iter_shard(shard, problems=problems)


def read_shards(
    directory: str | os.PathLike | Location, shards: Iterable[str] | None = None, *, problems: bool = False
):
    """Ray Dataset over the complete shards of `directory` (or the named `shards`), one read task per shard.

    Columns: key, shard, image (raw bytes, undecoded: decode with unicap.decode.decode_image in
    the consuming stage), source, original_caption, sha256, width, height. Failed index rows have
    no tar member and do not appear; read them with `read_index`. problems=True: also `read_error`,
    and a row for every item the tar could not deliver (see datagen.shard_reader.iter_tar)."""
    import ray

    folder = ShardFolder(directory)
    names = folder.list() if shards is None else list(shards)
    if not names:
        raise FileNotFoundError(f"no complete shards (*_stats.json) in {folder.uri}")
    items = ray.data.from_items([{"shard": s} for s in names], override_num_blocks=len(names))
    fn_kwargs = {"folder": folder, "problems": problems}
    return items.map_batches(_read_shard_batches, batch_size=1, batch_format="pyarrow", fn_kwargs=fn_kwargs)
