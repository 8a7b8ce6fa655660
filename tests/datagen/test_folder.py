import io

import pytest
from PIL import Image

from datagen.folder import MANIFEST, folder_key, ingest_folder
from datagen.hostile import hostile_cases
from datagen.shards import list_shards, read_index
from tests.conftest import snapshot
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
    with pytest.raises(RuntimeError, match="changed since"):
        ingest_folder(photo_folder, out, shard_size=3)
