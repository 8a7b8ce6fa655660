import io
import json
import os

import pytest
from PIL import Image

from datagen.folder import MANIFEST, folder_key, ingest_folder
from datagen.hostile import hostile_cases
from datagen.shards import list_shards, read_index
from tests.conftest import snapshot
from unicap.atomic import remove_stale_temporaries
from unicap.contract import shards


@pytest.fixture
def photo_folder(tmp_path):
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    for i in range(5):
        buf = io.BytesIO()
        Image.new("RGB", (90 + i, 70), (i * 40, 10, 10)).save(buf, "PNG")
        (root / ("sub" if i % 2 else "") / f"p{i}.png").write_bytes(buf.getvalue())
    (root / "p0.txt").write_text("a caption from a sidecar file\n")
    cases = {c.name: c for c in hostile_cases()}
    (root / "broken.jpg").write_bytes(cases["truncated_jpeg"].data)
    (root / "empty.webp").write_bytes(b"")
    (root / "notes.md").write_text("not an image")
    (root / ".hidden.png").write_bytes(b"ignored")
    return root


def test_folder_ingest_records_every_image_with_stable_keys(photo_folder, tmp_path):
    res = ingest_folder(photo_folder, tmp_path / "a", shard_size=3)
    assert res == {"images": 7, "shards": 3, "skipped_files": ["notes.md"]}
    for shard in list_shards(tmp_path / "a"):
        shards.validate_shard(tmp_path / "a", shard)
    index = read_index(tmp_path / "a").set_index("key")
    assert len(index) == 7
    assert index.loc[folder_key("p0.png"), "caption"] == "a caption from a sidecar file"
    assert index.loc[folder_key("sub/p1.png"), "status"] == "success"
    assert index.loc[folder_key("sub/p1.png"), "width"] == 91
    assert index.loc[folder_key("broken.jpg"), "error_message"].startswith("undecodable_image: truncated")
    assert index.loc[folder_key("empty.webp"), "error_message"].startswith("undecodable_image: empty_file")
    # same files, same keys, in another output folder
    ingest_folder(photo_folder, tmp_path / "b", shard_size=3)
    assert set(read_index(tmp_path / "b").key) == set(index.index)


def test_folder_ingest_resumes_and_refuses_a_changed_folder(photo_folder, tmp_path):
    out = tmp_path / "out"
    ingest_folder(photo_folder, out, shard_size=3)
    (out / "00002_stats.json").unlink()
    kept = snapshot(out)
    ingest_folder(photo_folder, out, shard_size=3)
    after = snapshot(out)
    assert {k: v for k, v in after.items() if not k.startswith("00002")} == {
        k: v for k, v in kept.items() if not k.startswith("00002")
    }
    assert "00002_stats.json" in after and (out / MANIFEST).exists()
    (photo_folder / "new.png").write_bytes((photo_folder / "p0.png").read_bytes())
    with pytest.raises(ValueError, match="changed since"):
        ingest_folder(photo_folder, out, shard_size=3)


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (50, 40), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


def test_links_special_files_and_odd_names_are_rows_and_nothing_outside_is_read(tmp_path, monkeypatch):
    root, out = tmp_path / "photos", tmp_path / "shards"
    root.mkdir()
    (tmp_path / "secret.txt").write_text("TOP SECRET, outside the folder")
    (tmp_path / "outside.png").write_bytes(_png())
    (root / "a.png").write_bytes(_png())
    (root / "a.txt").symlink_to(tmp_path / "secret.txt")  # a sidecar leading out of the folder
    (root / "b.png").symlink_to(tmp_path / "outside.png")  # an image leading out
    (root / "c.png").symlink_to(root / "a.png")  # inside: followed
    (root / "d.png").symlink_to(tmp_path / "gone.png")  # dangling
    os.mkfifo(root / "e.png")  # a FIFO: reading it would block forever
    (root / os.fsdecode(b"f\xff.png")).write_bytes(_png())  # not UTF-8
    (root / "g.png").write_bytes(b"")
    (root / "h.png").write_bytes(_png())
    (root / "loop.png").symlink_to(root / "loop.png")
    (root / "up").symlink_to(tmp_path, target_is_directory=True)  # a folder leading out: not entered
    os.mkfifo(root / "pipe")
    real_open = os.open

    def unreadable_h(path, flags, *a, **k):  # STAND-IN for chmod 000: the tests run as root
        if os.fsdecode(path).endswith("/h.png"):
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", unreadable_h)
    before = snapshot(tmp_path)
    res = ingest_folder(root, out, shard_size=4)
    assert res["images"] == 9 and sorted(res["skipped_files"]) == ["pipe", "up"]
    index = read_index(out).set_index("key")
    expect = {
        "a.png": None,
        "c.png": None,
        os.fsdecode(b"f\xff.png"): None,
        "b.png": "refused: ",
        "d.png": "dangling_symlink: ",
        "e.png": "not_a_regular_file: ",
        "g.png": "undecodable_image: empty_file",
        "h.png": "unreadable_file: ",
        "loop.png": "dangling_symlink: ",
    }
    assert sorted(index.index) == sorted(folder_key(name) for name in expect)
    for name, error in expect.items():
        row = index.loc[folder_key(name)]
        if error is None:
            assert row.status == "success", (name, row.error_message)
        else:
            assert row.status != "success" and row.error_message.startswith(error), (name, row.error_message)
    assert "outside the folder" in index.loc[folder_key("b.png"), "error_message"]
    assert index.loc[folder_key("a.png"), "caption"] is None  # the linked secret is not a caption
    assert "\\xff" in index.loc[folder_key(os.fsdecode(b"f\xff.png")), "url"]
    assert "TOP SECRET" not in "".join(str(v) for v in read_index(out).caption)
    for shard in list_shards(out):
        shards.validate_shard(out, shard)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["skipped_reasons"]["up"].startswith("symlinked folder")
    assert {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("shards/")} == before


def test_output_inside_the_folder_is_not_ingested_and_bad_arguments_are_refused(photo_folder, tmp_path):
    out = photo_folder / "shards"
    first = ingest_folder(photo_folder, out, shard_size=3)
    assert ingest_folder(photo_folder, out, shard_size=3) == first  # its own shards are not new images
    with pytest.raises(ValueError, match="--shard-size must be"):
        ingest_folder(photo_folder, tmp_path / "x", shard_size=0)
    with pytest.raises(NotADirectoryError):
        ingest_folder(tmp_path / "missing", tmp_path / "x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        ingest_folder(tmp_path / "empty", tmp_path / "x")
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "thesis.tex").write_text("a user's file")
    with pytest.raises(ValueError, match="thesis.tex"):
        ingest_folder(photo_folder, tmp_path / "theirs")
    assert not (tmp_path / "x").exists() and sorted(p.name for p in (tmp_path / "theirs").iterdir()) == ["thesis.tex"]


def test_only_this_jobs_temporaries_are_cleaned(photo_folder, tmp_path):
    out = tmp_path / "out"
    ingest_folder(photo_folder, out, shard_size=3)
    (out / "00002_stats.json").unlink()
    stale = out / ".00002.tar.tmp-0badf00d"  # a killed run's, exactly as atomic_path names them
    stale.write_bytes(b"half a tar")
    ingest_folder(photo_folder, out, shard_size=3)
    assert not stale.exists()
    # remove_stale_temporaries touches the atomic_path pattern only, and with `names` only those files
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    names = [
        ".00001.parquet.tmp-deadbeef",
        ".notes.txt.tmp-deadbeef",
        ".x.tmp-notahex",
        "a.tmp-deadbeef",
        "sub/.00002.parquet.tmp-0123abcd",
        ".00003.parquet.tmp-deadbeef.bak",
    ]
    for n in names:
        (d / n).write_text("x")
    (d / ".dir.tmp-deadbeef").mkdir()
    assert remove_stale_temporaries(d, names=lambda rel: rel.endswith(".parquet")) == 2
    left = sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file())
    assert left == sorted(set(names) - {".00001.parquet.tmp-deadbeef", "sub/.00002.parquet.tmp-0123abcd"})
    assert remove_stale_temporaries(d) == 1 and (d / ".dir.tmp-deadbeef").is_dir()  # pattern only: .notes.txt
