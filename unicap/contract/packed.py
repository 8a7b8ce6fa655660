"""The packed training shard: a stage's images resized to its buckets, with the captions it trains on.

Written by `pipelines.pack` (one pair per input image shard), read by `train.packed_stage` and `train.data`:

    PACKDIR/{shard}.tar      members {key}.jpg (RGB, resized and centre-cropped to the row's bucket,
                             JPEG quality 95) and {key}.json (the row's captions, for the loader)
    PACKDIR/{shard}.parquet  the index: one row per manifest row of the shard, failures included,
                             sorted by (bucket, key); written after the tar, it marks the shard complete
    PACKDIR/_pack.json       written before the first shard, completed at the end: version,
                             resolution, multiple, buckets ([[w, h], ...]), levels, languages,
                             shards (every shard of the manifest, sorted: a file's id is its
                             position here), manifest, manifest_fingerprint, complete, counts

Index columns: key, shard, bucket (int16 index into the bucket table; -1 for failed rows, which
therefore sort first and never share a run with images), width, height (the bucket's size),
offset / size (the image bytes inside the tar: `os.pread(fd, size, offset)`), json_offset /
json_size (the {key}.json member, written right after the image, so one pread covers both),
status (ok | failed), error ("<reason>: <detail>", reason from ERROR_REASONS; null when ok),
every caption_{level}_{lang} column of the caption record, original_caption.
The captions live in the index for people (pandas: `read_index(PACKDIR).to_pandas()`) and in
{key}.json for the loader's random access.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from unicap.atomic import visible_parquet_files
from unicap.contract import caption as caption_record
from unicap.contract.base import SchemaError, key_problems, missing_or_mistyped, nullable, raise_if, required

PACKED_VERSION = "1"
STATUSES: tuple[str, ...] = ("ok", "failed")
ERROR_REASONS: tuple[str, ...] = (
    "undecodable_image",  # the image bytes did not decode (detail: the decoder's reason)
    "missing_in_tar",  # the manifest names a key that the shard's tar does not hold
    "missing_shard",  # the manifest names a shard that the shard folder does not hold (complete)
    "no_caption_row",  # the caption folder has no row (or no file) for this key
    "no_usable_caption",  # the caption row has neither a caption nor an original caption
    "processing_error",  # an exception while packing this one item (detail: the exception)
)
FAILED_BUCKET = -1
PACK_META = "_pack.json"
JPEG_QUALITY = 95

META_VERSION = b"unicap.packed_version"  # beside caption_record's levels and languages metadata

# The columns the loader reads: run structure at start-up, tar positions per file when a batch needs them.
RUN_COLUMNS = ["bucket"]
POSITION_COLUMNS = ["offset", "size", "json_offset", "json_size"]


def tar_name(shard: str) -> str:
    return f"{shard}.tar"


def index_name(shard: str) -> str:
    return f"{shard}.parquet"


def shard_files(shard: str) -> tuple[str, str]:
    """The names of a packed shard's two files, (tar, index): what a reader of a remote stage fetches."""
    return tar_name(shard), index_name(shard)


def tar_path(packdir: str | Path, shard: str) -> Path:
    return Path(packdir) / tar_name(shard)


def index_path(packdir: str | Path, shard: str) -> Path:
    return Path(packdir) / index_name(shard)


def index_files(packdir: str | Path) -> list[Path]:
    """The packed index files, sorted (the tars beside them are not Parquet: list, do not glob the folder)."""
    return visible_parquet_files(packdir)


def read_index(packdir: str | Path, columns: Sequence[str] | None = None) -> pa.Table:
    """Every packed index row of the folder; `read_index(d).to_pandas()` for pandas (whose
    `read_parquet(d)` would try the tars too)."""
    return pa.concat_tables(
        [pq.read_table(p, columns=columns) for p in index_files(packdir)], promote_options="default"
    )


def text_columns(levels: Sequence[str], languages: Sequence[str]) -> list[str]:
    """The caption fields a packed row carries (index columns and {key}.json keys)."""
    return [*caption_record.caption_columns(levels, languages), "original_caption"]


def packed_schema(
    levels: Sequence[str] = caption_record.LEVELS, languages: Sequence[str] = caption_record.LANGUAGES
) -> pa.Schema:
    """The Arrow schema of a packed index for these caption levels and languages."""
    fields = [
        *required(key=pa.string(), shard=pa.string(), bucket=pa.int16()),
        *nullable(width=pa.int32(), height=pa.int32()),
        *nullable(offset=pa.int64(), size=pa.int32(), json_offset=pa.int64(), json_size=pa.int32()),
        *required(status=pa.string()),
        *nullable(error=pa.string()),
        *(pa.field(c, pa.string()) for c in text_columns(levels, languages)),
    ]
    meta = {META_VERSION: PACKED_VERSION.encode(), **caption_record.levels_metadata(levels, languages)}
    return pa.schema(fields, metadata=meta)


def levels_languages(schema: pa.Schema) -> tuple[tuple[str, ...], tuple[str, ...]]:
    meta = schema.metadata or {}
    if meta.get(META_VERSION) is None:
        raise SchemaError("not a packed index: no unicap.packed_version in the Parquet metadata")
    return caption_record.parse_levels_metadata(meta)


error_reason = caption_record.error_reason  # the same "<reason>: <detail>" errors, the same reading


def validate(table: pa.Table, buckets: Sequence[Sequence[int]] | None = None) -> None:
    """Check a packed index against the contract; raise SchemaError naming every violation.

    Structure: every column with its type, version metadata. Content: unique keys, statuses and
    reasons from the vocabularies, ok rows with a bucket, a size matching it and tar positions,
    failed rows with bucket -1, an error and no positions, rows sorted by (bucket, key)."""
    levels, languages = levels_languages(table.schema)
    raise_if(missing_or_mistyped(table.schema, packed_schema(levels, languages)), "packed index")
    d = table.select(["key", "bucket", "width", "height", "offset", "size", "status", "error"]).to_pydict()
    keys, bucket = d["key"], d["bucket"]
    problems = key_problems(keys)
    order = sorted(range(len(keys)), key=lambda i: (bucket[i], keys[i]))
    if order != list(range(len(keys))):
        problems.append("rows are not sorted by (bucket, key)")
    for i, key in enumerate(keys):
        status, error = d["status"][i], d["error"][i]
        if status == "ok":
            if error is not None or bucket[i] < 0 or d["offset"][i] is None or not d["size"][i]:
                problems.append(f"row {i} ({key}): ok rows need a bucket, an offset and a size and no error")
            elif buckets is not None and tuple(buckets[bucket[i]]) != (d["width"][i], d["height"][i]):
                problems.append(
                    f"row {i} ({key}): size {d['width'][i]}x{d['height'][i]} != bucket {buckets[bucket[i]]}"
                )
        elif status == "failed":
            if bucket[i] != FAILED_BUCKET or d["offset"][i] is not None:
                problems.append(f"row {i} ({key}): failed rows have bucket -1 and no image")
            if error_reason(error) not in ERROR_REASONS:
                problems.append(f"row {i} ({key}): error {error!r} does not start with one of {ERROR_REASONS}")
        else:
            problems.append(f"row {i} ({key}): status {status!r} not in {STATUSES}")
    raise_if(problems, "packed index")
