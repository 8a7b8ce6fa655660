"""Writing and reading image shards, shared by URL ingest (img2dataset), folder ingest and the synthetic set.

The format (tar + Parquet index + stats file written last) is the contract unicap.contract.shards:

    DIR/00000.tar          members {key}.{jpg|png|webp|...}, {key}.txt (caption), {key}.json (metadata)
    DIR/00000.parquet      the index: one row per input item, failures included (status, error_message)
    DIR/00000_stats.json   counts per status; written LAST, so its presence marks the shard complete

Readers: `read_index(DIR)` (pandas) and `read_shards(DIR)` (Ray Data: key, shard, image bytes,
metadata), the one reader every later job uses.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa

from unicap.atomic import atomic_path, write_json, write_parquet
from unicap.contract.shards import (
    IMAGE_EXTENSIONS,
    INDEX_SCHEMA,
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


def _bytes(v) -> bytes | None:
    """A tar member's bytes, or None where the sample lacks it (Ray fills those cells with NaN)."""
    return bytes(v) if isinstance(v, bytes | bytearray | memoryview) else None


def _normalise_batch(batch: dict) -> dict:
    """read_webdataset columns (__key__, __url__, jpg/png/..., txt, json) -> the reader's columns."""
    n = len(batch["__key__"])
    images: list[bytes | None] = [None] * n
    for ext in IMAGE_EXTENSIONS:
        for i, v in enumerate(batch.get(ext, ())):
            if images[i] is None:
                images[i] = _bytes(v)
    metas = [json.loads(m) if (m := _bytes(v)) else {} for v in batch.get("json", [None] * n)]
    txts = [(t := _bytes(v)) and t.decode(errors="replace") for v in batch.get("txt", [None] * n)]
    return {
        "key": [str(k) for k in batch["__key__"]],
        "shard": [Path(str(u)).stem for u in batch["__url__"]],
        "image": images,
        "source": [m.get("url") for m in metas],
        "original_caption": [t or m.get("caption") for t, m in zip(txts, metas, strict=True)],
        "sha256": [m.get("sha256") for m in metas],
        "width": [m.get("width") for m in metas],
        "height": [m.get("height") for m in metas],
    }


def shard_paths(directory: str | Path, shards: Iterable[str] | None = None) -> list[str]:
    names = list_shards(directory) if shards is None else list(shards)
    return [str(tar_path(Path(directory).resolve(), s)) for s in names]


def read_shards(directory: str | Path, shards: Iterable[str] | None = None, **read_kwargs):
    """Ray Dataset over the complete shards of `directory` (or the named `shards`).

    Columns: key, shard, image (raw bytes, undecoded: decode with unicap.decode.decode_image in
    the consuming stage), source, original_caption, sha256, width, height. Failed index rows have
    no tar member and do not appear; read them with `read_index`.
    """
    import ray

    paths = shard_paths(directory, shards)
    if not paths:
        raise FileNotFoundError(f"no complete shards (*_stats.json) in {directory}")
    ds = ray.data.read_webdataset(
        paths, decoder=None, file_extensions=["tar"], include_paths=True, **read_kwargs
    )
    return ds.map_batches(_normalise_batch, batch_format="default")
