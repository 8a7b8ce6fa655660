"""The caption record: the Parquet contract every job reads and writes.

One row per image, one file per input shard (`captions/{shard}.parquet`). Columns (see README
"The caption record"):

- identity:   key, shard, sha256, width, height, source, original_caption
- captions:   caption_{level}_{lang} for every configured level x language
- provenance: status, error, model, prompt_version, engine, num_output_tokens, created_at

`error` is null when `status == "ok"`, otherwise ``"<reason>: <detail>"`` where reason is one of
ERROR_REASONS (``df.error.str.split(":").str[0]`` groups failures by reason).
The schema version, levels and languages are stored in the Parquet file metadata.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence

import pyarrow as pa

from unicap.contract.base import SchemaError, check_names, key_problems, missing_or_mistyped, nullable, required

SCHEMA_VERSION = "1"
LEVELS: tuple[str, ...] = ("long", "medium", "short", "tags")
LANGUAGES: tuple[str, ...] = ("en", "zh")
STATUSES: tuple[str, ...] = ("ok", "partial", "failed")
ERROR_REASONS: tuple[str, ...] = (
    "undecodable_image",  # the decoder refused the bytes (detail: empty_file, not_an_image, truncated, ...)
    "download_failed",  # ingest could not fetch the source
    "empty_output",
    "wrong_language",
    "repetition_loop",
    "refusal",
    "truncated",  # generation stopped on the token limit
    "malformed_output",  # structured output that does not parse
    "timeout",
    "engine_error",
    "processing_error",  # an exception while a job handled this one item (detail: the exception); the rest go on
)

META_VERSION = b"unicap.schema_version"
META_LEVELS = b"unicap.levels"
META_LANGUAGES = b"unicap.languages"

IDENTITY_FIELDS: tuple[pa.Field, ...] = (
    *required(key=pa.string(), shard=pa.string()),
    *nullable(sha256=pa.string(), width=pa.int32(), height=pa.int32()),
    *nullable(source=pa.string(), original_caption=pa.string()),
)
PROVENANCE_FIELDS: tuple[pa.Field, ...] = (
    *required(status=pa.string()),
    *nullable(error=pa.string(), model=pa.string(), prompt_version=pa.string(), engine=pa.string()),
    *nullable(num_output_tokens=pa.int32(), created_at=pa.timestamp("us", tz="UTC")),
)


def caption_column(level: str, language: str) -> str:
    return f"caption_{level}_{language}"


def parse_caption_column(column: str) -> tuple[str, str]:
    """ "caption_long_en" -> ("long", "en")."""
    prefix, level, language = column.split("_", 2)
    if prefix != "caption" or not level or not language:
        raise ValueError(f"{column!r} is not a caption column (caption_{{level}}_{{language}})")
    return level, language


def caption_columns(levels: Sequence[str] = LEVELS, languages: Sequence[str] = LANGUAGES) -> list[str]:
    """Caption column names, level-major: caption_long_en, caption_long_zh, caption_medium_en, ..."""
    return [caption_column(lv, lang) for lv in levels for lang in languages]


def caption_schema(levels: Sequence[str] = LEVELS, languages: Sequence[str] = LANGUAGES) -> pa.Schema:
    """The Arrow schema of a caption file for these levels and languages, version in the metadata."""
    check_names((*levels, *languages))
    fields = [*IDENTITY_FIELDS, *(pa.field(c, pa.string()) for c in caption_columns(levels, languages))]
    fields += PROVENANCE_FIELDS
    meta = {META_VERSION: SCHEMA_VERSION.encode(), **levels_metadata(levels, languages)}
    return pa.schema(fields, metadata=meta)


def levels_metadata(levels: Sequence[str], languages: Sequence[str]) -> dict[bytes, bytes]:
    """The levels and languages as schema metadata, comma-separated: caption files and packed indexes carry it."""
    return {META_LEVELS: ",".join(levels).encode(), META_LANGUAGES: ",".join(languages).encode()}


def parse_levels_metadata(meta: dict[bytes, bytes]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(levels, languages) from metadata that `levels_metadata` wrote."""
    return tuple(meta[META_LEVELS].decode().split(",")), tuple(meta[META_LANGUAGES].decode().split(","))


def levels_languages(schema: pa.Schema) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The levels and languages a caption file declares in its metadata."""
    meta = schema.metadata or {}
    if META_LEVELS not in meta or META_LANGUAGES not in meta:
        raise SchemaError("not a unicap caption file: no unicap.levels / unicap.languages in the metadata")
    return parse_levels_metadata(meta)


def to_table(rows: Iterable[dict], levels: Sequence[str] = LEVELS, languages: Sequence[str] = LANGUAGES) -> pa.Table:
    """Build a caption table from row dicts; missing columns become null, unknown keys are an error."""
    schema = caption_schema(levels, languages)
    rows = list(rows)
    unknown = {k for r in rows for k in r} - set(schema.names)
    if unknown:
        raise SchemaError(f"unknown caption-record columns: {sorted(unknown)}")
    cols = {name: [r.get(name) for r in rows] for name in schema.names}
    return pa.Table.from_pydict(cols, schema=schema)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def error_reason(error: str | None) -> str | None:
    """The reason code of an `error` value ("truncated: finish_reason=length" -> "truncated")."""
    return None if error is None else error.split(":", 1)[0].strip()


def validate(table: pa.Table) -> None:
    """Check a caption table against the contract; raise SchemaError naming every violation.

    Structure: every column of the declared levels/languages with its type, version metadata.
    Content: unique non-empty keys, statuses and error reasons from the vocabularies, error null
    exactly when ok, every caption of an ok row non-empty, partial rows hold at least one caption.
    """
    problems: list[str] = []
    meta = table.schema.metadata or {}
    if meta.get(META_VERSION) != SCHEMA_VERSION.encode():
        problems.append(f"schema version {meta.get(META_VERSION)!r} != {SCHEMA_VERSION!r}")
    levels, languages = levels_languages(table.schema)
    problems += missing_or_mistyped(table.schema, caption_schema(levels, languages))
    if problems:
        raise SchemaError("; ".join(problems))

    d = table.select(["key", "status", "error", *caption_columns(levels, languages)]).to_pydict()
    keys = d["key"]
    problems += key_problems(keys)
    caps = caption_columns(levels, languages)
    for i, (key, status, error) in enumerate(zip(keys, d["status"], d["error"], strict=True)):
        if status not in STATUSES:
            problems.append(f"row {i} ({key}): status {status!r} not in {STATUSES}")
            continue
        filled = [bool(d[c][i] and d[c][i].strip()) for c in caps]
        if status == "ok":
            if error is not None:
                problems.append(f"row {i} ({key}): status ok with error {error!r}")
            if not all(filled):
                missing = [c for c, f in zip(caps, filled, strict=True) if not f]
                problems.append(f"row {i} ({key}): status ok but empty {missing}")
        else:
            if not error:
                problems.append(f"row {i} ({key}): status {status} without an error reason")
            elif error_reason(error) not in ERROR_REASONS:
                problems.append(f"row {i} ({key}): error reason {error_reason(error)!r} not in ERROR_REASONS")
            if status == "partial" and not any(filled):
                problems.append(f"row {i} ({key}): status partial with no caption")
        if len(problems) > 50:
            problems.append("... (stopped after 50 problems)")
            break
    if problems:
        raise SchemaError("; ".join(problems))
