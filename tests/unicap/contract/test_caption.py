import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from unicap.atomic import atomic_path, remove_stale_temporaries, write_parquet
from unicap.contract import caption as caption_record


def row(key: str, status: str = "ok", error: str | None = None, fill: bool = True, **kw) -> dict:
    caps = {c: f"text for {c}" if fill else None for c in caption_record.caption_columns()}
    return {"key": key, "shard": "00000", "status": status, "error": error, **caps, **kw}


def test_schema_columns_and_metadata():
    s = caption_record.caption_schema(levels=("long", "tags"), languages=("en", "zh", "ja"))
    assert [c for c in s.names if c.startswith("caption_")] == [
        "caption_long_en",
        "caption_long_zh",
        "caption_long_ja",
        "caption_tags_en",
        "caption_tags_zh",
        "caption_tags_ja",
    ]
    required = "key shard sha256 width height source original_caption status error model prompt_version engine"
    for name in [*required.split(), "num_output_tokens", "created_at"]:
        assert name in s.names
    assert s.metadata[caption_record.META_VERSION] == caption_record.SCHEMA_VERSION.encode()
    assert caption_record.levels_languages(s) == (("long", "tags"), ("en", "zh", "ja"))


def test_valid_table_roundtrips_through_parquet_and_pandas(tmp_path):
    rows = [
        row("a"),
        row("b", "failed", "undecodable_image: truncated: cut", fill=False),
        row("c", "partial", "wrong_language: caption_long_zh has no CJK", caption_long_zh=None),
    ]
    t = caption_record.to_table(rows)
    caption_record.validate(t)
    write_parquet(t, tmp_path / "00000.parquet")
    back = pq.read_table(tmp_path / "00000.parquet")
    caption_record.validate(back)  # metadata survives the file
    df = pd.read_parquet(tmp_path)
    assert list(df.key) == ["a", "b", "c"]
    assert df.error.str.split(":").str[0].tolist()[1:] == ["undecodable_image", "wrong_language"]


@pytest.mark.parametrize(
    "rows, message",
    [
        ([row("a"), row("a")], "duplicate keys"),
        ([row("a", error="timeout: x")], "status ok with error"),
        ([row("a", "failed")], "without an error reason"),
        ([row("a", "failed", "gremlins: x")], "not in ERROR_REASONS"),
        ([row("a", "maybe", "timeout: x")], "status 'maybe'"),
        ([row("a", caption_short_zh="  ")], "status ok but empty ['caption_short_zh']"),
        ([row("a", "partial", "refusal: x", fill=False)], "partial with no caption"),
        ([row("")], "empty or null key"),
    ],
)
def test_validate_names_each_violation(rows, message):
    with pytest.raises(caption_record.SchemaError, match=None) as e:
        caption_record.validate(caption_record.to_table(rows))
    assert message in str(e.value)


def test_an_item_that_raised_is_a_valid_failure():
    """Jobs record an exception on one item as that item's row (reason processing_error), not a crash."""
    caption_record.validate(
        caption_record.to_table([row("a", "failed", "processing_error: ValueError: x", fill=False)])
    )


def test_validate_rejects_structural_problems():
    t = caption_record.to_table([row("a")])
    with pytest.raises(caption_record.SchemaError, match="missing column caption_tags_zh"):
        caption_record.validate(t.drop(["caption_tags_zh"]))
    with pytest.raises(caption_record.SchemaError, match="has type int64"):
        caption_record.validate(t.set_column(t.schema.get_field_index("width"), "width", pa.array([1], pa.int64())))
    with pytest.raises(caption_record.SchemaError, match="schema version"):
        caption_record.validate(t.replace_schema_metadata({**t.schema.metadata, caption_record.META_VERSION: b"0"}))
    with pytest.raises(caption_record.SchemaError, match="not a unicap caption file"):
        caption_record.validate(pa.table({"key": ["a"]}))
    with pytest.raises(caption_record.SchemaError, match="unknown caption-record columns"):
        caption_record.to_table([row("a", caption_long_fr="x")])


def test_atomic_write_leaves_nothing_visible_on_failure(tmp_path):
    target = tmp_path / "00001.parquet"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half a file")
        raise RuntimeError("killed mid-write")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_readers_ignore_a_killed_writers_temporary(tmp_path):
    write_parquet(caption_record.to_table([row("a")]), tmp_path / "00000.parquet")
    (tmp_path / ".00001.parquet.tmp-deadbeef").write_bytes(b"PAR1 garbage from a kill -9")
    assert list(pd.read_parquet(tmp_path).key) == ["a"]
    assert remove_stale_temporaries(tmp_path) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["00000.parquet"]
