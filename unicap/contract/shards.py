"""The image shard: the input of every job (img2dataset's webdataset layout, for every ingest path).

One shard = three files:

    DIR/00000.tar          members {key}.{jpg|png|webp|...}, {key}.txt (caption), {key}.json (metadata)
    DIR/00000.parquet      the index: one row per input item, failures included (INDEX_SCHEMA)
    DIR/00000_stats.json   {"count": rows, "successes": images in the tar, "status": {status: n}};
                           written LAST, so its presence marks the shard complete

URL ingest writes the index through img2dataset (extra columns such as exif are allowed); folder
ingest and the synthetic set write exactly INDEX_SCHEMA. The shard reader yields READ_COLUMNS.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from unicap.contract.base import key_problems, nullable, raise_if

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
SUCCESS = "success"
INDEX_STATUSES = (SUCCESS, "failed_to_download", "failed_to_resize")  # img2dataset's vocabulary
STATS_SUFFIX = "_stats.json"

INDEX_SCHEMA = pa.schema(
    [
        # url: a URL or local path (the caption record's `source`); caption: the alt text / original caption
        *nullable(key=pa.string(), url=pa.string(), caption=pa.string()),
        *nullable(status=pa.string(), error_message=pa.string()),
        *nullable(width=pa.int64(), height=pa.int64(), original_width=pa.int64(), original_height=pa.int64()),
        *nullable(sha256=pa.string()),
    ]
)
REQUIRED_INDEX_COLUMNS = ("key", "status", "error_message")
# what `datagen.shards.read_shards` yields per image (image: the raw, undecoded bytes)
READ_COLUMNS = ("key", "shard", "image", "source", "original_caption", "sha256", "width", "height")

# The jobs' reader (`read_shards(..., problems=True)`) reads each tar against its index and also yields
# the items it could not deliver, with `read_error` set ("<reason>: <detail>", reasons from the caption
# record's vocabulary) and no image: every success row of the index comes out once, as an image or as
# a problem. A tar sample that belongs to no input row (a key the index does not list, a second sample
# of a key, a sample of a row the index lists as failed) is yielded with the REFUSED reason and a key no
# index can hold (keys have no "/": "k1/second-sample"): the jobs refuse it and count it in the shard's stats.
READ_ERROR = "read_error"
READER_SCHEMA = pa.schema(
    [
        *nullable(key=pa.string(), shard=pa.string(), image=pa.binary()),
        *nullable(source=pa.string(), original_caption=pa.string(), sha256=pa.string()),
        *nullable(width=pa.int64(), height=pa.int64()),
        pa.field(READ_ERROR, pa.string()),
    ]
)
MISSING_FROM_TAR = "undecodable_image: missing from tar"  # an index success row with no sample in the tar
REFUSED = "refused"  # reason of a tar sample that belongs to no input row (never written as a row)
MAX_MEMBER_BYTES = 256 << 20  # a tar member larger than this is not read (its item fails: too large)


def shard_name_ok(name: object) -> bool:
    """A shard name is a plain file name: no "/", no leading "." (outputs are named after it)."""
    return isinstance(name, str) and bool(name) and "/" not in name and "\\" not in name and not name.startswith(".")


def tar_path(directory: str | Path, shard: str) -> Path:
    return Path(directory) / f"{shard}.tar"


def index_path(directory: str | Path, shard: str) -> Path:
    return Path(directory) / f"{shard}.parquet"


def stats_path(directory: str | Path, shard: str) -> Path:
    return Path(directory) / f"{shard}{STATS_SUFFIX}"


def validate_index(table: pa.Table) -> None:
    """Check a shard index: the required columns, known types, unique keys usable as tar member names,
    statuses from img2dataset's vocabulary, an error message exactly on the failed rows."""
    problems = []
    names = table.schema.names
    problems += [f"missing column {c}" for c in REQUIRED_INDEX_COLUMNS if c not in names]
    for f in INDEX_SCHEMA:
        if f.name in names:
            got = table.schema.field(f.name).type
            ok = pa.types.is_integer(got) if pa.types.is_integer(f.type) else got.equals(f.type)
            if not ok and not pa.types.is_null(got):
                problems.append(f"column {f.name} has type {got}, expected {f.type}")
    raise_if(problems, "shard index")
    d = table.select(list(REQUIRED_INDEX_COLUMNS)).to_pydict()
    problems += key_problems(d["key"])
    for i, (key, status, error) in enumerate(zip(d["key"], d["status"], d["error_message"], strict=True)):
        if key and ("." in key or "/" in key):
            problems.append(f"row {i}: key {key!r} contains '.' or '/' (keys name tar members)")
        if status not in INDEX_STATUSES:
            problems.append(f"row {i} ({key}): status {status!r} not in {INDEX_STATUSES}")
        elif (status == SUCCESS) != (error is None):
            problems.append(f"row {i} ({key}): status {status} with error_message {error!r}")
    raise_if(problems, "shard index")


def validate_stats(stats: dict, index: pa.Table) -> None:
    """The stats file agrees with its index: every row counted, the successes are the images in the tar."""
    statuses = index.column("status").to_pylist()
    problems = []
    if stats.get("count") != len(statuses):
        problems.append(f"count {stats.get('count')} != {len(statuses)} index rows")
    if stats.get("successes") != statuses.count(SUCCESS):
        problems.append(f"successes {stats.get('successes')} != {statuses.count(SUCCESS)} success rows")
    raise_if(problems, "shard stats")


def validate_shard(directory: str | Path, shard: str) -> None:
    """Check one complete shard on disk: its index, and its stats file against the index."""
    index = pq.read_table(index_path(directory, shard))
    validate_index(index)
    validate_stats(json.loads(stats_path(directory, shard).read_text()), index)
