"""Writing and reading image shards, shared by URL ingest (img2dataset), folder ingest and the synthetic set.

The format (tar + Parquet index + stats file written last) is the contract unicap.contract.shards:

    DIR/00000.tar          members {key}.{jpg|png|webp|...}, {key}.txt (caption), {key}.json (metadata)
    DIR/00000.parquet      the index: one row per input item, failures included (status, error_message)
    DIR/00000_stats.json   counts per status; written LAST, so its presence marks the shard complete

Readers: `read_index(DIR)` (pandas) and `read_shards(DIR)` (Ray Data: key, shard, image bytes,
metadata), the one reader every later job uses. A tar is read against its index (`iter_shard`): a
truncated tar, a key the index lacks, an invalid {key}.json each cost their own items, never the shard.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from unicap.atomic import atomic_path, write_json, write_parquet
from unicap.contract.shards import (
    IMAGE_EXTENSIONS,
    INDEX_SCHEMA,
    MAX_MEMBER_BYTES,
    MISSING_FROM_TAR,
    READ_COLUMNS,
    READ_ERROR,
    READER_SCHEMA,
    REFUSED,
    STATS_SUFFIX,
    SUCCESS,
    index_path,
    stats_path,
    tar_path,
)


def shard_name(shard_id: int) -> str:
    return f"{shard_id:05d}"


def is_complete(directory: str | Path, shard: str) -> bool:
    return stats_path(directory, shard).exists()


def list_shards(directory: str | Path) -> list[str]:
    """Names of the complete shards in a folder, sorted."""
    return sorted(p.name[: -len(STATS_SUFFIX)] for p in Path(directory).glob(f"*{STATS_SUFFIX}"))


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


def write_shard(directory: str | Path, shard: str, items: Iterable[ShardItem]) -> dict:
    """Write one complete shard (tar, index, stats), each file atomically, stats last."""
    directory = Path(directory)
    rows, counts = [], Counter()
    with (
        atomic_path(tar_path(directory, shard)) as tmp,
        tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar,
    ):
        for it in items:
            if "." in it.key or "/" in it.key:
                raise ValueError(f"shard keys may not contain '.' or '/': {it.key!r}")
            ok = it.error is None
            status = SUCCESS if ok else "failed_to_download"
            counts[status] += 1
            rows.append(
                {
                    "key": it.key,
                    "url": it.source,
                    "caption": it.caption,
                    "status": status,
                    "error_message": it.error,
                    "width": it.width,
                    "height": it.height,
                    "original_width": it.width,
                    "original_height": it.height,
                    "sha256": it.sha256,
                }
            )
            if not ok:
                continue
            meta = {k: v for k, v in rows[-1].items() if k != "error_message"} | (it.meta or {})
            _add_member(tar, f"{it.key}.{it.ext}", it.image)
            _add_member(tar, f"{it.key}.txt", (it.caption or "").encode())
            _add_member(tar, f"{it.key}.json", json.dumps(meta, sort_keys=True).encode())
    write_parquet(pa.Table.from_pylist(rows, schema=INDEX_SCHEMA), index_path(directory, shard))
    stats = {"shard": shard, "count": len(rows), "successes": counts[SUCCESS], "status": dict(counts)}
    write_json(stats, stats_path(directory, shard))
    return stats


def read_index(directory: str | Path) -> pd.DataFrame:
    """Every input row of every complete shard (failures included), with a `shard` column."""
    frames = []
    for shard in list_shards(directory):
        df = pd.read_parquet(index_path(directory, shard))
        df["shard"] = shard
        frames.append(df)
    if not frames:
        return pd.DataFrame(columns=[*INDEX_SCHEMA.names, "shard"])
    return pd.concat(frames, ignore_index=True)


# ---------------------------------------------------------------- reading a shard against its index


def _str(v) -> str | None:
    return v if isinstance(v, str) else None


def _int(v) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and -(2**63) <= v < 2**63 else None


class _ShardReader:
    """Reads one shard's tar as a stream of samples (consecutive members sharing a key) and turns each
    into a reader row; remembers what it saw, so that the index rows the tar lacks come out too."""

    def __init__(self, directory: Path, shard: str):
        self.shard = shard
        index = pq.read_table(index_path(directory, shard)).to_pylist()
        self.index = {r["key"]: r for r in index if r.get("status") == SUCCESS}  # the images the tar must hold
        self.listed = {r["key"] for r in index}
        self.seen: set[str] = set()

    def row(self, key: str, members: dict[str, bytes | str]) -> dict:
        """One sample -> a reader row; members: extension -> bytes, or -> the reason it was not read."""
        row = dict.fromkeys(READER_SCHEMA.names) | {"key": key, "shard": self.shard}  # the rest None until known
        if key not in self.listed:
            return row | {READ_ERROR: f"{REFUSED}: {key!r} is in {self.shard}.tar but not in its index"}
        if key in self.seen:
            return row | {
                "key": f"{key}/second-sample",
                READ_ERROR: f"{REFUSED}: a second sample of {key!r} in the tar",
            }
        if key not in self.index:
            return row | {"key": f"{key}/index-failed", READ_ERROR: f"{REFUSED}: the index lists {key!r} as failed"}
        self.seen.add(key)
        too_large = [f"{key}.{ext} {v}" for ext, v in members.items() if isinstance(v, str)]
        if too_large:
            return row | {READ_ERROR: f"undecodable_image: {'; '.join(too_large)}"}
        try:
            meta = json.loads(members["json"]) if "json" in members else {}
            if not isinstance(meta, dict):
                raise ValueError(f"a JSON {type(meta).__name__}, not an object")
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            return row | {READ_ERROR: f"undecodable_image: invalid {key}.json: {e}"[:2000]}
        image = next((members[ext] for ext in IMAGE_EXTENSIONS if ext in members), None)
        if image is None:
            return row | {READ_ERROR: f"undecodable_image: no image member ({', '.join(sorted(members)) or 'none'})"}
        txt, listed = members.get("txt"), self.index[key]  # the index fills in what the sample lacks
        first = lambda name, cast: next(  # noqa: E731
            (v for v in (cast(meta.get(name)), cast(listed.get(name))) if v is not None), None
        )
        return row | {
            "image": image,
            "source": first("url", _str),
            "sha256": first("sha256", _str),
            "original_caption": (txt.decode(errors="replace") if txt else None) or first("caption", _str),
            "width": first("width", _int),
            "height": first("height", _int),
        }

    def missing(self, why: str | None) -> list[dict]:
        """The index's images the tar did not deliver, as problem rows (metadata from the index)."""
        detail = MISSING_FROM_TAR + (f" ({why})" if why else "")
        return [
            {
                "key": k,
                "shard": self.shard,
                "image": None,
                "source": _str(r.get("url")),
                "original_caption": _str(r.get("caption")),
                "sha256": _str(r.get("sha256")),
                "width": _int(r.get("width")),
                "height": _int(r.get("height")),
                READ_ERROR: detail,
            }
            for k, r in sorted(self.index.items())
            if k not in self.seen
        ]


def _samples(path: Path):
    """(key, {extension: bytes | reason}) per sample of a webdataset tar, streamed; then (None, why)
    where why says how the tar ended early (None: it ended well). When the tar is cut off, the samples
    read before the cut stand and the one in progress is dropped (its key comes out as missing).
    Opening the file may raise OSError: a shard that cannot be read at all is the job's error."""
    key, members, count = None, {}, 0
    with open(path, "rb") as f:
        try:
            tar = tarfile.open(fileobj=f, mode="r|")
            for m in tar:
                if not m.isfile():
                    continue
                base = m.name.rsplit("/", 1)[-1]
                k = m.name[: len(m.name) - len(base)] + base.split(".", 1)[0]
                ext = base.split(".", 1)[1].lower() if "." in base else ""
                if k != key and key is not None:
                    yield key, members
                    members = {}
                key = k
                too_large = f"is {m.size} bytes (limit {MAX_MEMBER_BYTES})"
                members[ext] = tar.extractfile(m).read() if m.size <= MAX_MEMBER_BYTES else too_large
                count += 1
        except (tarfile.TarError, EOFError) as e:  # cut off or garbled: what was read before stands
            yield None, f"{path.name} is truncated or corrupt after {count} members: {type(e).__name__}: {e}"
            return
    if key is not None:
        yield key, members
    yield None, None


def iter_shard(
    directory: str | Path, shard: str, *, problems: bool = False, batch_rows: int = 64, batch_bytes: int = 64 << 20
) -> Iterator[pa.Table]:
    """One shard, read against its index, as tables of READER_SCHEMA (problems=True) or READ_COLUMNS.

    Every success row of the index comes out exactly once: as its image, or (problems=True) as a row
    with `read_error` and no image: missing from the tar (also when the tar is cut off: the samples
    before the cut stand), an invalid {key}.json, no image member, a member over MAX_MEMBER_BYTES.
    Tar samples that belong to no input row come out with the REFUSED reason, for the jobs to refuse
    and count. With problems=False those rows are left out (the index keeps every input row)."""
    reader, rows, size = _ShardReader(Path(directory), shard), [], 0

    def flush() -> pa.Table:
        table = pa.Table.from_pylist(rows, schema=READER_SCHEMA)
        if not problems:
            table = table.filter(pc.is_null(table.column(READ_ERROR))).select(list(READ_COLUMNS))
        rows.clear()
        return table

    for key, members in _samples(tar_path(directory, shard)):
        if key is None:
            rows.extend(reader.missing(members))
            break
        rows.append(reader.row(key, members))
        size += len(rows[-1]["image"] or b"")
        if len(rows) >= batch_rows or size >= batch_bytes:
            yield flush()
            size = 0
    if rows:
        yield flush()


def _read_shard_batches(batch: pa.Table, problems: bool) -> Iterator[pa.Table]:
    for directory, shard in zip(batch.column("directory").to_pylist(), batch.column("shard").to_pylist(), strict=True):
        yield from iter_shard(directory, shard, problems=problems)


def read_shards(directory: str | Path, shards: Iterable[str] | None = None, *, problems: bool = False):
    """Ray Dataset over the complete shards of `directory` (or the named `shards`), one read task per shard.

    Columns: key, shard, image (raw bytes, undecoded: decode with unicap.decode.decode_image in
    the consuming stage), source, original_caption, sha256, width, height. Failed index rows have
    no tar member and do not appear; read them with `read_index`. problems=True (the jobs): also
    `read_error`, and a row for every item the tar could not deliver (see `iter_shard`)."""
    import ray

    names = list_shards(directory) if shards is None else list(shards)
    if not names:
        raise FileNotFoundError(f"no complete shards (*_stats.json) in {directory}")
    root = str(Path(directory).resolve())
    items = ray.data.from_items([{"directory": root, "shard": s} for s in names], override_num_blocks=len(names))
    return items.map_batches(
        _read_shard_batches, batch_size=1, batch_format="pyarrow", fn_kwargs={"problems": problems}
    )
