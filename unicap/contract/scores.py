"""The score tables: per-shard quality scores keyed by `key`, and the CLIP image embeddings beside them.

    scores/{shard}.parquet               score_schema(levels, languages): one row per input row
    scores/_embeddings/{shard}.parquet   EMBEDDINGS_SCHEMA: key, embedding (unit CLIP image embedding,
                                         float16); the same rows in the same order as the score file
    scores/_dedup/duplicates.parquet     the duplicates table (unicap.contract.dedup)

Score columns: identity (key, shard, width, height, min_side, aspect_ratio = long side / short side,
sha256, source), the caption's state (caption_status: the caption record's status, or "missing";
caption_levels_ok: the levels whose captions exist in every language, comma-separated), decode_error
(null when the image decoded), clip_{level}_{lang} (cosine of the image and caption embeddings, null
when the caption or a tower for its language is missing), aesthetic, clip_model. The score files carry
no metadata: their levels and languages are read from the clip_* column names.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from unicap.contract import caption
from unicap.contract.base import (
    SchemaError,
    check_names,
    key_problems,
    missing_or_mistyped,
    nullable,
    raise_if,
    required,
)

EMBED_DIR = "_embeddings"  # "_": not read by pandas.read_parquet(scores/)
CAPTION_STATUSES: tuple[str, ...] = (*caption.STATUSES, "missing")  # "missing": no caption row for the image
# a clip score column; the only column names stage rules may put into SQL (as quoted identifiers)
CLIP_COLUMN = re.compile(r"clip_([A-Za-z][A-Za-z0-9]*)_([A-Za-z][A-Za-z0-9]*)")
COSINE_SLACK = 1e-3  # bf16 autocast may put a cosine a hair outside [-1, 1]

IDENTITY_FIELDS: tuple[pa.Field, ...] = (
    *required(key=pa.string(), shard=pa.string()),
    *nullable(width=pa.int32(), height=pa.int32(), min_side=pa.int32(), aspect_ratio=pa.float32()),
    *nullable(sha256=pa.string(), source=pa.string()),
    *nullable(caption_status=pa.string(), caption_levels_ok=pa.string(), decode_error=pa.string()),
)
TRAILING_FIELDS: tuple[pa.Field, ...] = tuple(nullable(aesthetic=pa.float32(), clip_model=pa.string()))
EMBEDDING_FIELD = pa.field("embedding", pa.list_(pa.float16()))
EMBEDDINGS_SCHEMA = pa.schema([pa.field("key", pa.string(), nullable=False), EMBEDDING_FIELD])


def clip_column(level: str, language: str) -> str:
    return f"clip_{level}_{language}"


def parse_clip_column(column: str) -> tuple[str, str]:
    """ "clip_long_en" -> ("long", "en"); anything else is a ValueError."""
    m = CLIP_COLUMN.fullmatch(column) if isinstance(column, str) else None
    if not m:
        raise ValueError(f"{column!r} is not a clip score column (clip_{{level}}_{{language}}, e.g. clip_long_en)")
    return m.group(1), m.group(2)


def clip_columns(levels: Sequence[str] = caption.LEVELS, languages: Sequence[str] = caption.LANGUAGES) -> list[str]:
    """Clip score column names, level-major like the caption columns they score."""
    return [clip_column(lv, lang) for lv in levels for lang in languages]


def score_schema(levels: Sequence[str] = caption.LEVELS, languages: Sequence[str] = caption.LANGUAGES) -> pa.Schema:
    """The Arrow schema of a score file for these caption levels and languages."""
    check_names((*levels, *languages))
    clip = [pa.field(c, pa.float32()) for c in clip_columns(levels, languages)]
    return pa.schema([*IDENTITY_FIELDS, *clip, *TRAILING_FIELDS])


def with_embedding(schema: pa.Schema) -> pa.Schema:
    """The score job's in-flight rows: a score row plus its embedding (split apart when written)."""
    return schema.append(EMBEDDING_FIELD)


def embeddings_path(score_dir: str | Path, shard: str) -> Path:
    return Path(score_dir) / EMBED_DIR / f"{shard}.parquet"


def levels_languages(schema: pa.Schema) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The levels and languages a score file holds clip scores for, in column order."""
    levels, languages = [], []
    for name in schema.names:
        if name.startswith("clip_") and name != "clip_model":
            level, language = parse_clip_column(name)
            levels += [level] if level not in levels else []
            languages += [language] if language not in languages else []
    return tuple(levels), tuple(languages)


def validate(table: pa.Table) -> None:
    """Check a score table: columns and types (clip columns a full level x language grid), unique keys,
    caption statuses from the vocabulary, sizes consistent, scores finite (missing is null), cosines
    within [-1, 1]."""
    try:
        levels, languages = levels_languages(table.schema)
    except ValueError as e:
        raise SchemaError(f"score table: {e}") from None
    problems = missing_or_mistyped(table.schema, score_schema(levels, languages))
    if not levels:
        problems.append("no clip_{level}_{language} column")
    raise_if(problems, "score table")
    problems += key_problems(table.column("key").to_pylist())
    if pc.any(pc.invert(pc.fill_null(pc.greater(pc.utf8_length(table.column("shard")), 0), False))).as_py():
        problems.append("empty or null shard")
    bad = pc.invert(pc.is_in(table.column("caption_status"), value_set=pa.array(CAPTION_STATUSES)))
    if pc.any(bad).as_py():
        seen = sorted(set(pc.filter(table.column("caption_status"), bad).to_pylist()), key=str)
        problems.append(f"caption_status {seen} not in {CAPTION_STATUSES}")
    decoded = pc.is_null(table.column("decode_error"))
    no_size = pc.and_(decoded, pc.or_(pc.is_null(table.column("width")), pc.is_null(table.column("height"))))
    if pc.any(no_size).as_py():
        problems.append(f"{pc.sum(no_size).as_py()} decoded rows without width/height")
    w, h = table.column("width"), table.column("height")
    wrong_side = pc.fill_null(pc.not_equal(table.column("min_side"), pc.min_element_wise(w, h)), False)
    if pc.any(wrong_side).as_py():
        problems.append(f"{pc.sum(wrong_side).as_py()} rows with min_side != min(width, height)")
    if pc.any(pc.fill_null(pc.less(table.column("aspect_ratio"), 1 - 1e-6), False)).as_py():
        problems.append("aspect_ratio below 1 (it is the long side over the short side)")
    for col in [*clip_columns(levels, languages), "aesthetic"]:
        bad = pc.sum(pc.invert(pc.is_finite(table.column(col)))).as_py()  # nulls count as missing, not bad
        if bad:
            problems.append(f"{bad} non-finite values (NaN/inf) in {col}: a missing score is null")
        if col == "aesthetic":
            continue
        lo, hi = pc.min_max(table.column(col)).values()
        if lo.is_valid and (lo.as_py() < -1 - COSINE_SLACK or hi.as_py() > 1 + COSINE_SLACK):
            problems.append(f"{col} outside [-1, 1]: {lo.as_py()}..{hi.as_py()}")
    raise_if(problems, "score table")


def validate_embeddings(embeddings: pa.Table, scores: pa.Table | None = None) -> None:
    """Check an embeddings file: its schema, one dimension, unit vectors, and (given its score file)
    the same keys in the same order (dedup addresses rows by position in both)."""
    problems = missing_or_mistyped(embeddings.schema, EMBEDDINGS_SCHEMA)
    raise_if(problems, "embeddings")
    if scores is not None and embeddings.column("key").to_pylist() != scores.column("key").to_pylist():
        problems.append("keys differ from the score file's (same rows, same order expected)")
    col = embeddings.column("embedding").combine_chunks()
    lengths = pc.list_value_length(col).drop_null()
    if len(lengths) and pc.count_distinct(lengths).as_py() != 1:
        problems.append(f"embeddings of several dimensions: {sorted(set(lengths.to_pylist()))[:5]}")
    elif len(lengths):
        values = pc.list_flatten(col.drop_null()).cast(pa.float32())
        flat = values.to_numpy(zero_copy_only=False)
        norms = (flat.reshape(len(lengths), -1) ** 2).sum(1) ** 0.5
        if pc.sum(pc.invert(pc.is_finite(values))).as_py():
            problems.append("embeddings with NaN/inf values")
        elif len(norms) and abs(norms - 1).max() > 1e-2:
            problems.append(f"embeddings are not unit vectors (norms {norms.min():.3f}..{norms.max():.3f})")
    raise_if(problems, "embeddings")
