"""The pack job on a real Ray instance: synthetic shards + captions + a stage manifest -> packed shards."""

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from datagen.shards import ShardItem, write_shard
from datagen.synth import synth, synth_item
from pipelines.pack import pack_stage
from pipelines.pack_manifest import manifest_keys, shards_dir_of, split_manifest
from tests.conftest import snapshot
from train.buckets import bucket_table
from unicap import storage
from unicap.atomic import write_parquet
from unicap.cli import main as unicap
from unicap.contract import caption as caption_record
from unicap.contract import packed

pytest_plugins = ["tests.s3_server"]  # the fixtures s3_server, bucket, s3
REPO = Path(__file__).resolve().parents[2]


def _truth_row(item, caps: dict, shard: str) -> dict:
    row = {"key": item.key, "shard": shard, "width": item.width, "height": item.height, "source": item.source}
    return {**row, "original_caption": item.caption, **caps, "status": "ok"}


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    """4 synthetic shards of 6 (00003 not in the manifest) + shard 00004 with a broken image and a row
    without usable captions; captions with one row removed; a manifest with a ghost key and a missing shard."""
    data = tmp_path_factory.mktemp("data")
    synth(str(data), 24, seed=3, shard_size=6)
    captions = data / "captions"
    shutil.copytree(data / "truth", captions)
    t = pd.read_parquet(captions / "00001.parquet")
    dropped = t.key.iloc[2]
    write_parquet(caption_record.to_table(t[t.key != dropped].to_dict("records")), captions / "00001.parquet")
    pairs = [synth_item(3, 100 + i) for i in range(3)]
    items = [it for it, _ in pairs]
    items[1] = ShardItem(key=items[1].key, source="broken", image=b"\xff\xd8\xff\xe0 not really a jpeg", ext="jpg")
    items[2].caption = None  # no alt text in the shard either: nothing to train on
    write_shard(data, "00004", items)
    rows = [_truth_row(it, caps, "00004") for it, caps in pairs]
    rows[2] = {"key": items[2].key, "shard": "00004", "status": "failed", "error": "empty_output: synthetic"}
    write_parquet(caption_record.to_table(rows), captions / "00004.parquet")
    index = pd.concat([pd.read_parquet(data / f"0000{i}.parquet").assign(shard=f"0000{i}") for i in (0, 1, 2, 4)])
    index = index[index.key != index.key.iloc[5]]  # a shard row left out of the stage
    ghosts = pd.DataFrame({"key": ["s3_ghost", "s9_lost_a", "s9_lost_b"], "shard": ["00000", "00099", "00099"]})
    manifest = pd.concat([index[["key", "shard", "width", "height"]], ghosts], ignore_index=True)
    manifest["location"] = manifest.shard.map(lambda s: str(data / f"{s}.tar"))
    manifest.to_parquet(data / "stage1.parquet")
    return data, captions, manifest, dropped, items


@pytest.fixture(scope="module")
def packed_stage(ray_local, stage, tmp_path_factory):
    data, captions, *_ = stage
    out = tmp_path_factory.mktemp("packed")
    meta = pack_stage(data / "stage1.parquet", captions, out, resolution=256, batch_size=4)
    return out, meta


def test_every_manifest_row_is_packed_or_failed_with_a_reason(stage, packed_stage):
    data, captions, manifest, dropped, items = stage
    out, meta = packed_stage
    buckets = bucket_table(256)
    assert meta["buckets"] == [list(b) for b in buckets] and meta["complete"]
    assert sorted(p.stem for p in out.glob("*.parquet")) == ["00000", "00001", "00002", "00004", "00099"]
    assert not (out / "00003.tar").exists() and not (out / "_work").exists()  # only the manifest's shards
    for p in sorted(out.glob("*.parquet")):
        packed.validate(pq.read_table(p), buckets)
    df = packed.read_index(out).to_pandas()
    assert sorted(df.key) == sorted(manifest.key)
    reasons = df.set_index("key").error.str.split(":").str[0]
    assert reasons["s3_ghost"] == "missing_in_tar"
    assert reasons["s9_lost_a"] == reasons["s9_lost_b"] == "missing_shard"
    assert reasons[dropped] == "no_caption_row"
    assert reasons[items[1].key] == "undecodable_image"
    assert reasons[items[2].key] == "no_usable_caption"
    assert (df.status == "failed").sum() == 6 and df[df.status == "failed"].bucket.eq(-1).all()
    counts = meta["counts"]
    assert counts["rows"] == len(manifest) and counts["status"] == {"ok": len(manifest) - 6, "failed": 6}
    reasons = dict(missing_in_tar=1, missing_shard=2, no_caption_row=1, undecodable_image=1, no_usable_caption=1)
    assert counts["failures_by_reason"] == reasons
    truth = pd.read_parquet(captions).set_index("key")
    ok = df[df.status == "ok"].set_index("key")
    assert (ok.caption_long_en == truth.caption_long_en.reindex(ok.index)).all()


def test_tar_offsets_images_and_captions_match_the_index(packed_stage):
    out, meta = packed_stage
    buckets = [tuple(b) for b in meta["buckets"]]
    for shard in ("00000", "00004"):
        index = pd.read_parquet(out / f"{shard}.parquet")
        with tarfile.open(out / f"{shard}.tar") as tar:
            members = {m.name: m for m in tar.getmembers()}
        assert set(members) == {f"{k}.{e}" for k in index.key[index.status == "ok"] for e in ("jpg", "json")}
        raw = (out / f"{shard}.tar").read_bytes()
        for r in index[index.status == "ok"].itertuples():
            m = members[f"{r.key}.jpg"]
            offset, size, json_offset, json_size = (
                int(r.offset),
                int(r.size),
                int(r.json_offset),
                int(r.json_size),
            )
            assert (m.offset_data, m.size) == (offset, size)
            im = Image.open(io.BytesIO(raw[offset : offset + size]))
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (r.width, r.height) == buckets[r.bucket]
            text = json.loads(raw[json_offset : json_offset + json_size])
            assert text["key"] == r.key and text["caption_short_zh"] == r.caption_short_zh
            assert r.json_offset > r.offset  # image then captions: one pread covers both


def test_rerun_writes_nothing_and_a_lost_shard_is_redone(stage, packed_stage):
    data, captions, *_ = stage
    out, _ = packed_stage
    before = snapshot(out)
    pack_stage(data / "stage1.parquet", captions, out, resolution=256, batch_size=4)
    assert snapshot(out) == before
    index = pd.read_parquet(out / "00001.parquet")
    (out / "00001.parquet").unlink()  # as if killed before shard 00001 was complete
    pack_stage(data / "stage1.parquet", captions, out, resolution=256, batch_size=4)
    after = snapshot(out)
    assert after["00000.parquet"] == before["00000.parquet"] and after["00000.tar"] == before["00000.tar"]
    assert "00001.parquet" in after and after["00001.tar"] != before["00001.tar"]
    assert pd.read_parquet(out / "00001.parquet").equals(index)  # the same bytes at the same offsets
    with pytest.raises(ValueError, match="another --output"):
        pack_stage(data / "stage1.parquet", captions, out, resolution=512)


def test_the_loader_serves_every_ok_row_of_the_packed_stage(packed_stage):
    from train.batch_plan import BatchPlanner
    from train.config import DataConfig
    from train.data import PackedBatches
    from train.packed_stage import PackedStage

    out, meta = packed_stage
    stage = PackedStage(out)
    assert stage.missing == [] and stage.complete and stage.buckets == [tuple(b) for b in meta["buckets"]]
    ds = PackedBatches(stage, DataConfig(packed=str(out), micro_batch=3, caption_dropout=0.0), seed=0)
    batches = [ds[g] for g in range(BatchPlanner(stage, 3, 0).batches_per_epoch)]
    df = packed.read_index(out).to_pandas().set_index("key")
    assert sorted(k for b in batches for k in b["keys"]) == sorted(df.index[df.status == "ok"])
    for b in batches:
        assert b["skipped"] == 0 and b["images"].shape[2:] == b["bucket"][::-1]
        for key, caption in zip(b["keys"], b["captions"], strict=True):
            assert caption in set(df.loc[key, [c for c in df.columns if c.startswith(("caption_", "original"))]])


def test_paths_with_quotes_reach_duckdb_as_parameters_and_bad_shard_names_are_refused(stage, packed_stage, tmp_path):
    """The manifest split pasted paths into DuckDB SQL (read_parquet('{glob}'), COPY ... TO '{dir}',
    SET temp_directory='{dir}'): a quote in a folder name broke it (or rewrote the statement)."""
    data, captions, manifest, *_ = stage
    _, meta = packed_stage
    quoted = tmp_path / "it's stages"
    quoted.mkdir()
    shutil.copy(data / "stage1.parquet", quoted / "stage1.parquet")
    out = tmp_path / "o'packed"
    got = pack_stage(quoted / "stage1.parquet", captions, out, shards_dir=data, resolution=256, batch_size=8)
    assert got["complete"] and got["counts"] == meta["counts"]
    assert sorted(packed.read_index(out).column("key").to_pylist()) == sorted(manifest.key)
    hostile = manifest.assign(shard=manifest.shard.where(manifest.index % 7 != 3, "../escaped"))
    hostile.to_parquet(quoted / "stage1.parquet")
    with pytest.raises(ValueError, match=r"shards \[.\.\./escaped.\], which are not shard names"):
        pack_stage(quoted / "stage1.parquet", captions, tmp_path / "other", shards_dir=data)
    assert not (tmp_path / "escaped.parquet").exists()


# ---------------------------------------------------------------- object storage


def upload(local: Path, target) -> None:
    """Every file under the local folder `local`, to the same relative paths under the Location `target`."""
    for f in sorted(p for p in local.rglob("*") if p.is_file()):
        target.join(f.relative_to(local).as_posix()).write_bytes(f.read_bytes())


def test_the_manifest_split_in_a_bucket_equals_the_local_one(stage, tmp_path, s3):
    """The per-shard key files the workers read (OUTPUT/_work/manifest/{shard}.parquet) are written through
    storage: the same keys per shard from a manifest and a work folder in a bucket as on a local disk."""
    data, _, manifest, *_ = stage
    bucket = storage.resolve(s3)
    bucket.join("stage1.parquet").write_bytes((data / "stage1.parquet").read_bytes())
    local = split_manifest(data / "stage1.parquet", storage.resolve(tmp_path / "work"), "fp")
    remote = split_manifest(f"{s3}/stage1.parquet", bucket.join("out", "_work"), "fp")
    assert remote == local == manifest.groupby("shard").size().to_dict()
    for shard in local:
        want = sorted(manifest.key[manifest.shard == shard])
        assert manifest_keys(bucket.join("out", "_work"), shard) == manifest_keys(tmp_path / "work", shard) == want
    assert manifest_keys(bucket.join("out", "_work"), "00003") == []  # a shard the manifest does not name
    assert [p.name for p in tmp_path.joinpath("work").iterdir()] != [] and not (
        tmp_path / "work" / "duckdb_tmp"
    ).exists()
    assert shards_dir_of(f"{s3}/stage1.parquet") == str(data)  # the location column's folder


@pytest.mark.slow  # a Ray instance of its own, in a subprocess that has the bucket's AWS_* variables
def test_pack_from_and_to_a_bucket_equals_the_local_pack(stage, packed_stage, tmp_path, s3):
    """`python -m pipelines.pack` with every path a URI: the same index rows, the same tar bytes and the same
    counts as the local pack; nothing but _pack.json, the shards and the job's own files in the bucket."""
    data, *_ = stage
    out, meta = packed_stage
    bucket = storage.resolve(s3)
    upload(data, bucket.join("data"))
    work = tmp_path / "cwd"
    work.mkdir()
    scratch = tempfile.mkdtemp(prefix="pk")  # short: Ray's socket paths under TMPDIR must fit in 107 bytes
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "TMPDIR": scratch, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    uris = ["--manifest", f"{s3}/data/stage1.parquet", "--captions", f"{s3}/data/captions", "--shards", f"{s3}/data"]
    cmd = [sys.executable, "-m", "pipelines.pack", *uris, "--output", f"{s3}/packed", "--batch-size", "4"]
    try:
        r = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=300)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert os.listdir(work) == []  # nothing written to the working folder
    packed_dir = bucket.join("packed")
    got = packed_dir.join(packed.PACK_META).read_json()
    assert got["complete"] and got["counts"] == meta["counts"] and got["shards"] == meta["shards"]
    assert got["shards_dir"] == f"{s3}/data" and got["buckets"] == meta["buckets"]
    assert not packed_dir.join("_work").is_dir()
    for shard in meta["shards"]:
        index = packed_dir.join(f"{shard}.parquet").read_parquet()
        want = pq.read_table(out / f"{shard}.parquet")
        packed.validate(index, [tuple(b) for b in meta["buckets"]])
        assert index.drop_columns(["error"]).equals(want.drop_columns(["error"])), shard
        reasons = [packed.error_reason(e) if e else None for e in index.column("error").to_pylist()]
        assert reasons == [packed.error_reason(e) if e else None for e in want.column("error").to_pylist()]
        assert packed_dir.join(f"{shard}.tar").read_bytes() == (out / f"{shard}.tar").read_bytes()


def test_a_manifest_in_a_missing_bucket_is_one_line_and_exit_status_2(s3, tmp_path, capsys):
    missing = s3.replace("s3://", "s3://no-such-")
    args = ["--manifest", f"{missing}/stage1.parquet", "--captions", f"{s3}/captions", "--output", str(tmp_path)]
    assert unicap(["pack", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert "error: " in err and "does not exist" in err and len(err.splitlines()) == 1, err
