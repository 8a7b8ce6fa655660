"""The data-getting commands with a bucket for their paths (moto's S3 server), against the same command on a
local folder: synth, ingest-folder, ingest (img2dataset through s3fs) and eval-captions."""

import io
import json
import tarfile
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from datagen.shards import ShardFolder, list_shards, read_index
from unicap import storage
from unicap.cli import main as unicap

pytest_plugins = ["tests.s3_server"]  # the fixtures s3_server, bucket, s3


def local_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def bucket_files(uri: str) -> dict[str, bytes]:
    loc = storage.resolve(uri)
    base = len(loc.path.rstrip("/")) + 1
    return {f.path[base:]: f.read_bytes() for f in loc.files(recursive=True)}


PROBE_PUTS = 2  # storage.check_writable: its probe object, and the empty "prefix/" marker its delete leaves


def puts(s3_server) -> int:
    """Uploads since the last reset, less the write check's."""
    return sum(n for (_, kind), n in s3_server.requests().items() if kind in ("put", "multipart")) - PROBE_PUTS


def one_error_line(capsys, *words: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, err
    return err


def missing_bucket(s3: str) -> str:
    return s3 + "-missing"  # a fresh name nobody created


# ---------------------------------------------------------------- synth


def test_synth_to_a_bucket_writes_the_same_bytes_and_resumes_by_shard(s3, s3_server, tmp_path):
    args = ["--n", "10", "--shard-size", "4", "--seed", "5"]
    assert unicap(["synth", "--out", str(tmp_path / "synth"), *args]) == 0
    assert unicap(["synth", "--out", f"{s3}/synth", *args]) == 0
    here, there = local_files(tmp_path / "synth"), bucket_files(f"{s3}/synth")
    assert sorted(there) == sorted(here) and "truth/00002.parquet" in there
    assert there == here  # tars, indexes, stats and truth: byte for byte
    assert list_shards(f"{s3}/synth") == ["00000", "00001", "00002"]

    s3_server.reset()
    assert unicap(["synth", "--out", f"{s3}/synth", *args]) == 0
    assert puts(s3_server) == 0  # all complete: nothing rewritten
    storage.resolve(f"{s3}/synth/00001_stats.json").delete()  # as if killed before shard 1 completed
    s3_server.reset()
    assert unicap(["synth", "--out", f"{s3}/synth", *args]) == 0
    assert puts(s3_server) == 4  # shard 1 again: truth, tar, index, stats
    assert bucket_files(f"{s3}/synth") == here


def test_synth_into_a_missing_bucket_is_one_line(s3, capsys):
    assert unicap(["synth", "--out", f"{missing_bucket(s3)}/synth", "--n", "2"]) == 2
    one_error_line(capsys, f"'{missing_bucket(s3)[5:]}' does not exist")


# ---------------------------------------------------------------- ingest-folder


@pytest.fixture
def photos(tmp_path) -> Path:
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    for i in range(5):
        buf = io.BytesIO()
        Image.new("RGB", (60 + i, 40), (i * 40, 10, 10)).save(buf, "PNG")
        (root / ("sub" if i % 2 else "") / f"p{i}.png").write_bytes(buf.getvalue())
    (root / "p0.txt").write_text("a sidecar caption\n")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff not a whole jpeg")
    (root / "notes.md").write_text("not an image")
    return root


def test_ingest_folder_to_a_bucket_writes_the_same_bytes_and_resumes(photos, s3, s3_server, tmp_path):
    assert unicap(["ingest-folder", str(photos), "--out", str(tmp_path / "shards"), "--shard-size", "3"]) == 0
    assert unicap(["ingest-folder", str(photos), "--out", f"{s3}/shards", "--shard-size", "3"]) == 0
    here, there = local_files(tmp_path / "shards"), bucket_files(f"{s3}/shards")
    assert sorted(there) == sorted(here) and "_ingest.json" in there and "00001.tar" in there
    assert there == here
    assert len(read_index(f"{s3}/shards")) == 6

    storage.resolve(f"{s3}/shards/00001_stats.json").delete()
    s3_server.reset()
    assert unicap(["ingest-folder", str(photos), "--out", f"{s3}/shards", "--shard-size", "3"]) == 0
    assert puts(s3_server) == 3  # shard 1's tar, index and stats; the manifest is kept
    assert bucket_files(f"{s3}/shards") == here
    (photos / "new.png").write_bytes((photos / "p0.png").read_bytes())
    assert unicap(["ingest-folder", str(photos), "--out", f"{s3}/shards", "--shard-size", "3"]) == 2  # changed


def test_ingest_folder_into_a_missing_bucket_or_from_a_uri_is_one_line(photos, s3, capsys):
    assert unicap(["ingest-folder", str(photos), "--out", f"{missing_bucket(s3)}/shards"]) == 2
    one_error_line(capsys, f"'{missing_bucket(s3)[5:]}' does not exist")
    assert unicap(["ingest-folder", f"{s3}/photos", "--out", f"{s3}/shards"]) == 2
    one_error_line(capsys, "needs a local folder")


# ---------------------------------------------------------------- ingest (img2dataset)


def _tar_members(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


@pytest.mark.slow  # img2dataset's download processes, twice: make test runs it, make test-fast does not
def test_ingest_to_a_bucket_records_what_a_local_ingest_does(http_server, s3, s3_server, tmp_path):
    root, base = http_server
    rows = []
    for i in range(3):
        buf = io.BytesIO()
        Image.new("RGB", (50 + i, 30), (80 * i, 90, 200)).save(buf, "JPEG")
        (root / f"img{i}.jpg").write_bytes(buf.getvalue())
        rows.append({"url": f"{base}/img{i}.jpg", "caption": f"image {i}"})
    rows.append({"url": f"{base}/missing.jpg", "caption": "gone"})
    urls = tmp_path / "urls.csv"
    pd.DataFrame(rows).to_csv(urls, index=False)
    storage.resolve(f"{s3}/lists/urls.csv").write_bytes(urls.read_bytes())  # the list may be in the bucket too
    common = ["--caption-col", "caption", "--shard-size", "4", "--threads", "4", "--allow-private"]
    assert unicap(["ingest", str(urls), "--out", str(tmp_path / "shards"), *common]) == 0
    assert unicap(["ingest", f"{s3}/lists/urls.csv", "--out", f"{s3}/shards", *common]) == 0

    here, there = local_files(tmp_path / "shards"), bucket_files(f"{s3}/shards")
    assert sorted(there) == sorted(here) == ["00000.parquet", "00000.tar", "00000_stats.json"]
    assert _tar_members(there["00000.tar"]).keys() == _tar_members(here["00000.tar"]).keys()
    for name, data in _tar_members(here["00000.tar"]).items():
        if not name.endswith(".json"):  # {key}.json holds nothing that differs either, but is not compared
            assert _tar_members(there["00000.tar"])[name] == data, name
    local_index = ShardFolder(tmp_path / "shards").index("00000").to_pandas().sort_values("key", ignore_index=True)
    bucket_index = ShardFolder(f"{s3}/shards").index("00000").to_pandas().sort_values("key", ignore_index=True)
    pd.testing.assert_frame_equal(bucket_index, local_index)  # the same rows (downloads finish in any order)
    assert (local_index.status == "success").sum() == 3
    stats = json.loads(there["00000_stats.json"])
    assert stats["count"] == 4 and stats["successes"] == 3

    s3_server.reset()  # a re-run finds the shard complete: nothing downloaded, nothing written
    assert unicap(["ingest", f"{s3}/lists/urls.csv", "--out", f"{s3}/shards", *common]) == 0
    assert puts(s3_server) == 0 and bucket_files(f"{s3}/shards") == there


def test_ingest_into_a_missing_bucket_is_one_line(s3, tmp_path, capsys):
    (tmp_path / "urls.txt").write_text("http://127.0.0.1:9/a.png\n")
    assert unicap(["ingest", str(tmp_path / "urls.txt"), "--out", f"{missing_bucket(s3)}/shards"]) == 2
    one_error_line(capsys, f"'{missing_bucket(s3)[5:]}' does not exist")
    assert unicap(["ingest", f"{missing_bucket(s3)}/urls.txt", "--out", str(tmp_path / "out")]) == 2
    one_error_line(capsys, f"'{missing_bucket(s3)[5:]}' does not exist")


# ---------------------------------------------------------------- eval-captions


def test_eval_captions_reads_a_bucket_and_writes_its_metrics_there(s3, tmp_path, capsys):
    args = ["--n", "8", "--shard-size", "4", "--seed", "2"]
    assert unicap(["synth", "--out", str(tmp_path / "synth"), *args]) == 0
    assert unicap(["synth", "--out", f"{s3}/synth", *args]) == 0
    for name, data in local_files(tmp_path / "synth" / "truth").items():  # captions: the truth itself
        storage.resolve(f"{s3}/captions/{name}").write_bytes(data)
    local = ["--captions", str(tmp_path / "synth" / "truth"), "--truth", str(tmp_path / "synth")]
    assert unicap(["eval-captions", *local]) == 0
    assert unicap(["eval-captions", "--captions", f"{s3}/captions", "--truth", f"{s3}/synth"]) == 0
    assert "goal" in capsys.readouterr().out
    here = json.loads((tmp_path / "synth" / "truth" / "_eval.json").read_text())
    there = storage.resolve(f"{s3}/captions/_eval.json").read_json()
    assert there["truth"] == f"{s3}/synth/truth" and there["captions"] == f"{s3}/captions"
    drop = ("captions", "truth")
    assert {k: v for k, v in there.items() if k not in drop} == {k: v for k, v in here.items() if k not in drop}
    assert there["rows"] == 8 and there["goal"]["met"]


def test_eval_captions_with_a_missing_bucket_is_one_line(s3, tmp_path, capsys):
    assert unicap(["synth", "--out", str(tmp_path / "synth"), "--n", "2"]) == 0
    capsys.readouterr()
    gone = missing_bucket(s3)
    assert unicap(["eval-captions", "--captions", f"{gone}/captions", "--truth", str(tmp_path / "synth")]) == 2
    one_error_line(capsys, f"'{gone[5:]}' does not exist")
    caps = str(tmp_path / "synth" / "truth")
    assert unicap(["eval-captions", "--captions", caps, "--truth", f"{gone}/synth", "--out", f"{s3}/m.json"]) == 2
    one_error_line(capsys, f"'{gone[5:]}' does not exist")
