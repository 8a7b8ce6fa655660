"""Reading one shard's tar against its index: every success row of the index comes out exactly once.

The tar is streamed (a local file or an object-store download alike); `datagen.shards.ShardFolder.iter_shard`
opens it and hands the stream here. A truncated tar, a key the index lacks, an invalid {key}.json each cost their
own items, never the shard.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from typing import BinaryIO

import pyarrow as pa
import pyarrow.compute as pc

from unicap.contract.shards import (
    IMAGE_EXTENSIONS,
    MAX_MEMBER_BYTES,
    MISSING_FROM_TAR,
    READ_COLUMNS,
    READ_ERROR,
    READER_SCHEMA,
    REFUSED,
    SUCCESS,
)

# the index columns the reader uses (img2dataset's indexes carry more, e.g. exif)
INDEX_COLUMNS_READ = ("key", "url", "caption", "status", "width", "height", "sha256")


def _str(v) -> str | None:
    return v if isinstance(v, str) else None


def _int(v) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and -(2**63) <= v < 2**63 else None


class _ShardReader:
    """Reads one shard's tar as a stream of samples (consecutive members sharing a key) and turns each
    into a reader row; remembers what it saw, so that the index rows the tar lacks come out too."""

    def __init__(self, index: pa.Table, shard: str):
        self.shard = shard
        index = index.select([c for c in INDEX_COLUMNS_READ if c in index.column_names]).to_pylist()
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


def _samples(stream: BinaryIO, name: str):
    """(key, {extension: bytes | reason}) per sample of a webdataset tar, streamed; then (None, why)
    where why says how the tar ended early (None: it ended well). When the tar is cut off, the samples
    read before the cut stand and the one in progress is dropped (its key comes out as missing).
    Reading the stream may raise OSError: a shard that cannot be read at all is its job's failure."""
    key, members, count = None, {}, 0
    with stream as f:
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
            yield None, f"{name} is truncated or corrupt after {count} members: {type(e).__name__}: {e}"
            return
    if key is not None:
        yield key, members
    yield None, None


def iter_tar(
    index: pa.Table,
    stream: BinaryIO,
    name: str,
    shard: str,
    *,
    problems: bool = False,
    batch_rows: int = 64,
    batch_bytes: int = 64 << 20,
) -> Iterator[pa.Table]:
    """One shard's tar (`stream`, named `name` in messages), read against its `index`, as tables of
    READER_SCHEMA (problems=True) or READ_COLUMNS.

    Every success row of the index comes out exactly once: as its image, or (problems=True) as a row
    with `read_error` and no image: missing from the tar (also when the tar is cut off: the samples
    before the cut stand), an invalid {key}.json, no image member, a member over MAX_MEMBER_BYTES.
    Tar samples that belong to no input row come out with the REFUSED reason, for the jobs to refuse
    and count. With problems=False those rows are left out (the index keeps every input row)."""
    reader, rows, size = _ShardReader(index, shard), [], 0

    def flush() -> pa.Table:
        table = pa.Table.from_pylist(rows, schema=READER_SCHEMA)
        if not problems:
            table = table.filter(pc.is_null(table.column(READ_ERROR))).select(list(READ_COLUMNS))
        rows.clear()
        return table

    for key, members in _samples(stream, name):
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
