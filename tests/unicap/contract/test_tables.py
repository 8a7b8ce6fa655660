"""The table contracts other than the caption record: shard index, scores, embeddings, duplicates, manifests.

Each validator accepts what its writer writes (the writers' own tests check their real outputs) and
names what is wrong in a table that breaks it.
"""

import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from datagen.score_tables import score_chunk, write_score_table
from datagen.shards import ShardItem, write_shard
from unicap.contract import dedup, manifest, scores, shards
from unicap.contract.base import SchemaError


def replace(table: pa.Table, name: str, values) -> pa.Table:
    i = table.schema.get_field_index(name)
    return table.set_column(i, table.schema.field(i), pa.array(values, table.schema.field(i).type))


# ---------------------------------------------------------------- shard index


@pytest.fixture
def index(tmp_path) -> pa.Table:
    items = [
        ShardItem("a", "a.png", image=b"\x89PNG", ext="png", width=2, height=2, sha256="x"),
        ShardItem("b", "b.png", error="undecodable_image: truncated: cut"),
    ]
    stats = write_shard(tmp_path, "00000", items)
    table = pq.read_table(shards.index_path(tmp_path, "00000"))
    shards.validate_stats(stats, table)
    assert shards.stats_path(tmp_path, "00000").exists() and shards.tar_path(tmp_path, "00000").exists()
    return table


def test_the_shard_writer_keeps_the_index_contract(index):
    shards.validate_index(index)
    assert index.schema.names == shards.INDEX_SCHEMA.names


@pytest.mark.parametrize(
    "column, values, message",
    [
        ("key", ["a", "a"], "duplicate keys"),
        ("key", ["a.jpg", "b"], "contains '.' or '/'"),
        ("status", ["success", "gone"], "status 'gone' not in"),
        ("error_message", ["oops", "undecodable_image: x"], "status success with error_message 'oops'"),
        ("error_message", [None, None], "status failed_to_download with error_message None"),
    ],
)
def test_index_violations_are_named(index, column, values, message):
    with pytest.raises(SchemaError, match=message):
        shards.validate_index(replace(index, column, values))


def test_shard_names_are_plain_file_names():
    """Outputs are named after shards: a manifest's "../x" must never become a path."""
    assert shards.shard_name_ok("00000") and shards.shard_name_ok("part-7")
    for bad in ("", "../x", "a/b", ".hidden", "a\\b", None, 3):
        assert not shards.shard_name_ok(bad)


def test_index_structure_and_stats(index):
    with pytest.raises(SchemaError, match="missing column status"):
        shards.validate_index(index.drop(["status"]))
    with pytest.raises(SchemaError, match="column url has type int64"):
        shards.validate_index(index.drop(["url"]).append_column("url", pa.array([1, 2])))
    # img2dataset may leave optional columns out
    shards.validate_index(index.drop(["url", "caption", "sha256"]))
    with pytest.raises(SchemaError, match="successes 2 != 1"):
        shards.validate_stats({"count": 2, "successes": 2}, index)


# ---------------------------------------------------------------- scores and embeddings


def test_the_score_table_generator_keeps_the_score_contract(tmp_path):
    table = score_chunk(0, 3000, seed=1)
    scores.validate(table)
    assert table.schema.equals(scores.score_schema(("long", "medium", "short"), ("en",)))
    assert scores.levels_languages(table.schema) == (("long", "medium", "short"), ("en",))
    for path in write_score_table(tmp_path, 2500, rows_per_file=1000, seed=2):
        scores.validate(pq.read_table(path))


@pytest.mark.parametrize(
    "column, fill, message",
    [
        ("caption_status", "maybe", "caption_status ['maybe'] not in"),
        ("clip_long_en", 1.5, "clip_long_en outside"),
        ("min_side", 1, "min_side != min(width, height)"),
        ("aspect_ratio", 0.5, "aspect_ratio below 1"),
        ("shard", "", "empty or null shard"),
        ("clip_short_en", float("nan"), "50 non-finite values (NaN/inf) in clip_short_en"),
        ("aesthetic", float("-inf"), "50 non-finite values (NaN/inf) in aesthetic"),
    ],
)
def test_score_violations_are_named(column, fill, message):
    t = score_chunk(0, 50, seed=3)
    with pytest.raises(SchemaError, match=re.escape(message)):
        scores.validate(replace(t, column, [fill] * 50))


def test_score_structure():
    t = score_chunk(0, 20)
    with pytest.raises(SchemaError, match="missing column clip_medium_zh"):  # clip columns: a full grid
        scores.validate(t.append_column(pa.field("clip_long_zh", pa.float32()), pa.nulls(20, pa.float32())))
    with pytest.raises(SchemaError, match="has type double"):
        scores.validate(t.drop(["aesthetic"]).append_column("aesthetic", pa.array(np.zeros(20))))
    with pytest.raises(SchemaError, match="no clip_"):
        scores.validate(t.drop(["clip_long_en", "clip_medium_en", "clip_short_en"]))
    with pytest.raises(ValueError, match="not a clip score column"):
        scores.parse_clip_column('clip_long_en"; DROP TABLE scores; --')
    assert scores.parse_clip_column("clip_long_en") == ("long", "en")


def test_embeddings_contract():
    keys = ["a", "b", "c"]
    unit = np.eye(3, 4, dtype=np.float16)
    emb = pa.table(
        {"key": keys, "embedding": pa.array([list(r) for r in unit], pa.list_(pa.float16()))},
        schema=scores.EMBEDDINGS_SCHEMA,
    )
    score = pa.table({"key": keys})
    scores.validate_embeddings(emb, score)
    with pytest.raises(SchemaError, match="keys differ"):
        scores.validate_embeddings(emb, pa.table({"key": ["b", "a", "c"]}))
    with pytest.raises(SchemaError, match="not unit vectors"):
        scores.validate_embeddings(replace(emb, "embedding", [list(r * 2) for r in unit]))
    with pytest.raises(SchemaError, match="several dimensions"):
        scores.validate_embeddings(replace(emb, "embedding", [[1.0], [1.0, 0.0], None]))
    with pytest.raises(SchemaError, match="NaN/inf"):
        scores.validate_embeddings(replace(emb, "embedding", [[float("nan"), 0, 0, 0], *[list(r) for r in unit[1:]]]))


# ---------------------------------------------------------------- duplicates and manifests


def test_duplicates_contract():
    t = pa.table(
        {"key": ["b", "d"], "duplicate_of": ["a", "c"], "kind": ["exact", "near"], "similarity": [1.0, 0.97]},
        schema=dedup.DUP_SCHEMA,
    )
    dedup.validate(t)
    for column, values, message in [
        ("kind", ["exact", "fuzzy"], "kind"),
        ("duplicate_of", ["b", "c"], "own"),
        ("similarity", [0.9, 0.97], "exact duplicates with similarity"),
        ("key", ["b", "b"], "duplicate keys"),
    ]:
        with pytest.raises(SchemaError, match=message):
            dedup.validate(replace(t, column, values))


def filler(f: pa.Field, n: int) -> pa.Array:
    """n values of the field's type: 1, 1.0 or "{name}{i}"."""
    if pa.types.is_integer(f.type):
        return pa.array([1] * n, f.type)
    if pa.types.is_floating(f.type):
        return pa.array([1.0] * n, f.type)
    return pa.array([f"{f.name}{i}" for i in range(n)], f.type)


def manifest_table(composite) -> pa.Table:
    cols = {f.name: filler(f, len(composite)) for f in manifest.MANIFEST_SCHEMA}
    cols["composite"] = pa.array(composite, pa.float64())
    return pa.table(cols, schema=manifest.MANIFEST_SCHEMA)


def test_manifest_contract():
    manifest.validate(manifest_table([2.0, 1.0, 1.0]))  # ties: by key
    with pytest.raises(SchemaError, match="not ordered by composite"):
        manifest.validate(manifest_table([1.0, 2.0]))
    with pytest.raises(SchemaError, match="without a composite"):
        manifest.validate(manifest_table([1.0, None]))
    with pytest.raises(SchemaError, match="non-finite composite"):  # NaN sorts anywhere: no ranking at all
        manifest.validate(manifest_table([float("nan"), float("nan")]))
    with pytest.raises(SchemaError, match="column width has type int64"):
        t = manifest_table([1.0])
        manifest.validate(t.set_column(t.schema.get_field_index("width"), "width", pa.array([1], pa.int64())))
    with pytest.raises(ValueError, match="stage 'stage4'"):
        manifest.manifest_path("out", "stage4")
