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


def test_hostile_urls_each_get_their_row_and_redirects_are_checked(local_web, tmp_path):
    """One shard holding a bad IDNA host, redirects to file:// / ftp:// / another local address, data:
    and overlong URLs: img2dataset used to lose the whole shard on the first, and follow the others."""
    a, b = local_web
    to = f"{a.url}/to?u="
    rows = {
        f"{a.url}/img/ok.png": ("success", None),
        "http://" + "x" * 70 + ".example/a.png": ("failed_to_download", "refused: host"),
        "http://exa mple.com/a.png": ("failed_to_download", "refused"),
        to + f"{b.url}/img/moved.png": ("success", None),
        to + "file:///etc/passwd": ("failed_to_download", "refused: scheme 'file'"),
        to + "ftp://127.0.0.1/a.png": ("failed_to_download", "refused: scheme 'ftp'"),
        "data:image/png;base64,iVBORw0KGgo=": ("failed_to_download", "refused: scheme 'data'"),
        f"{a.url}/img/{'a' * 9000}.png": ("failed_to_download", "refused: URL longer"),
        f"{a.url}/loop": ("failed_to_download", "more than 5 redirects"),
        f"{a.url}/img/with,comma.png": ("success", None),
    }
    path = tmp_path / "urls.txt"
    path.write_text("\n".join(rows) + "\n")
    out = tmp_path / "shards"
    assert unicap(["ingest", str(path), "--out", str(out), "--allow-private", "--threads", "4"]) == 0
    index = read_index(out).set_index("url")
    assert sorted(index.index) == sorted(rows)  # every URL once, in one shard
    for url, (status, message) in rows.items():
        assert index.loc[url, "status"] == status, (url, index.loc[url, "error_message"])
        if message:
            assert message in index.loc[url, "error_message"], (url, index.loc[url, "error_message"])
    # without --allow-private nothing local is contacted at all
    hits = len(a.hits) + len(b.hits)
    assert unicap(["ingest", str(path), "--out", str(tmp_path / "refused"), "--threads", "4"]) == 0
    assert len(a.hits) + len(b.hits) == hits
    assert (read_index(tmp_path / "refused").status == "failed_to_download").all()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--shard-size", "0"], "--shard-size must be"),
        (["--threads", "0"], "--threads must be"),
        (["--timeout", "0"], "--timeout must be"),
        (["--retries", "-1"], "--retries must be"),
        (["--url-col", "link"], "no column 'link'"),
    ],
)
def test_bad_arguments_are_one_line_errors_before_any_download(extra, message, tmp_path, capsys):
    path = tmp_path / "urls.csv"
    pd.DataFrame({"url": ["http://127.0.0.1:9/a.png"]}).to_csv(path, index=False)
    assert unicap(["ingest", str(path), "--out", str(tmp_path / "out"), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_missing_or_unsupported_lists_and_foreign_output_folders_are_refused(tmp_path, capsys):
    assert unicap(["ingest", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "urls.xlsx").write_text("x")
    assert unicap(["ingest", str(tmp_path / "urls.xlsx"), "--out", str(tmp_path / "o")]) == 2
    assert "unsupported URL list" in capsys.readouterr().err
    (tmp_path / "urls.txt").write_text("http://127.0.0.1:9/a.png\n")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.json").write_text("{}")  # img2dataset would parse its name as a shard id
    before = snapshot(tmp_path / "mine")
    assert unicap(["ingest", str(tmp_path / "urls.txt"), "--out", str(tmp_path / "mine")]) == 2
    assert "notes.json" in capsys.readouterr().err and snapshot(tmp_path / "mine") == before


def test_incomplete_shards_are_named(tmp_path):
    from datagen.ingest import incomplete_shards

    (tmp_path / "00000_stats.json").write_text('{"count": 4}')
    (tmp_path / "00001_stats.json").write_text('{"count": 3}')  # a shard that lost a row
    assert incomplete_shards(tmp_path, 10, 4) == {1: "3 rows, expected 4", 2: "no _stats.json (2 URLs not recorded)"}
    assert incomplete_shards(tmp_path, 7, 4) == {}
