"""URL ingest against a real `python -m http.server` on 127.0.0.1, with real img2dataset."""

import io

import pandas as pd
import pytest
from PIL import Image

from datagen.shards import list_shards, read_index
from tests.conftest import free_port, snapshot
from unicap.cli import main as unicap
from unicap.contract import shards


@pytest.fixture
def url_list(http_server, tmp_path):
    root, base = http_server
    good = []
    for i in range(5):
        buf = io.BytesIO()
        Image.new("RGB", (100 + 10 * i, 80), (40 * i, 90, 200)).save(buf, "JPEG")
        (root / f"img{i}.jpg").write_bytes(buf.getvalue())
        good.append((f"{base}/img{i}.jpg", f"image number {i}"))
    jpeg = (root / "img0.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "page.jpg").write_text("<html>not an image</html>")
    bad = {
        f"{base}/missing.jpg": ("failed_to_download", "404"),
        f"http://127.0.0.1:{free_port()}/refused.jpg": ("failed_to_download", "refused"),
        f"{base}/page.jpg": ("failed_to_resize", "undecodable_image: not_an_image"),
        f"{base}/truncated.jpg": ("failed_to_resize", "undecodable_image: truncated"),
    }
    rows = [{"url": u, "caption": c} for u, c in good] + [{"url": u, "caption": "bad"} for u in bad]
    path = tmp_path / "urls.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path, [u for u, _ in good], bad


def _ingest(url_list, out, *extra):
    args = ["ingest", str(url_list), "--out", str(out), "--caption-col", "caption", "--shard-size", "4", *extra]
    assert unicap(args) == 0


def test_every_url_accounted_for_and_rerun_writes_nothing(url_list, tmp_path):
    path, good, bad = url_list
    out = tmp_path / "shards"
    _ingest(path, out, "--allow-private")
    for shard in list_shards(out):
        shards.validate_shard(out, shard)  # img2dataset's index keeps the shard contract
    index = read_index(out)
    assert sorted(index.url) == sorted(good + list(bad))  # every URL exactly once
    assert index.key.is_unique
    assert sorted(index.shard.unique()) == ["00000", "00001", "00002"]
    by_url = index.set_index("url")
    for u in good:
        assert by_url.loc[u, "status"] == "success", by_url.loc[u, "error_message"]
        assert pd.isna(by_url.loc[u, "error_message"])
        assert by_url.loc[u, "height"] == 80 and by_url.loc[u, "sha256"]
    for u, (status, message) in bad.items():
        assert by_url.loc[u, "status"] == status, (u, by_url.loc[u, "error_message"])
        assert message in by_url.loc[u, "error_message"].lower(), by_url.loc[u, "error_message"]
    assert set(index.caption[index.status == "success"]) == {f"image number {i}" for i in range(5)}

    before = snapshot(out)
    _ingest(path, out, "--allow-private")
    assert snapshot(out) == before  # resumed by shard: nothing new, nothing rewritten


def test_private_addresses_refused_by_default(url_list, tmp_path):
    path, good, bad = url_list
    out = tmp_path / "refused"
    _ingest(path, out)
    index = read_index(out)
    assert len(index) == len(good) + len(bad)
    assert (index.status == "failed_to_download").all()
    assert index.error_message.str.startswith("refused: host '127.0.0.1' resolves to").all()
    assert index.error_message.str.contains("--allow-private").all()
