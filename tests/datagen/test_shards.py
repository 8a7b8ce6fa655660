"""The one shard reader, on a real Ray instance, over synthetic and folder-ingested shards."""

import hashlib

import pandas as pd

from datagen import synth
from datagen.shards import read_index, read_shards
from unicap.contract.shards import READ_COLUMNS
from unicap.decode import decode_image


def test_ray_read_returns_every_image_once(ray_local, tmp_path):
    synth.synth(str(tmp_path), 40, seed=3, shard_size=8)
    rows = read_shards(tmp_path).take_all()
    truth = pd.read_parquet(tmp_path / "truth").set_index("key")
    assert len(rows) == 40 and len({r["key"] for r in rows}) == 40
    assert all(list(r) == list(READ_COLUMNS) for r in rows)  # the reader's contract
    assert {r["key"] for r in rows} == set(truth.index)
    assert {r["shard"] for r in rows} == {f"{i:05d}" for i in range(5)}
    for r in rows:
        assert hashlib.sha256(r["image"]).hexdigest() == r["sha256"] == truth.loc[r["key"], "sha256"]
        assert r["shard"] == truth.loc[r["key"], "shard"]
        assert (r["width"], r["height"]) == (truth.loc[r["key"], "width"], truth.loc[r["key"], "height"])
        assert r["original_caption"] == truth.loc[r["key"], "original_caption"]
        assert decode_image(r["image"]).ok


def test_ray_read_of_named_shards_and_failed_rows_stay_in_the_index(ray_local, tmp_path):
    from datagen.folder import ingest_folder
    from datagen.hostile import hostile_cases

    root = tmp_path / "imgs"
    root.mkdir()
    for c in hostile_cases():
        (root / f"{c.name}.png").write_bytes(c.data)
    ingest_folder(root, tmp_path / "shards", shard_size=4)
    index = read_index(tmp_path / "shards")
    ok = index[index.status == "success"]
    rows = read_shards(tmp_path / "shards").take_all()
    assert sorted(r["key"] for r in rows) == sorted(ok.key)
    assert len(index) == len(hostile_cases())  # failures are rows of the index, not drops
    first = read_shards(tmp_path / "shards", shards=["00000"]).take_all()
    assert {r["key"] for r in first} == set(ok[ok.shard == "00000"].key)
