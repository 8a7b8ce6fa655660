"""A seeded fuzz of hostile inputs through URL ingest, folder ingest and the caption engine's server mode.

Invariants, for every generated mix: every input item comes out exactly once, ok or with a reason;
nothing raises; nothing outside the output folder is touched (the parent folder is snapshotted);
nothing internal is contacted unless --allow-private; nothing outside an ingested folder is read.

Servers and network: real local HTTP servers (tests/datagen/conftest.py) and the caption STAND-IN
server (tests/pipelines/standin_server.py). Where a test needs the public internet (none here), a
STAND-IN resolver answers names and every connection is carried to a local server
(`FakePublicNetwork` in test_url_guard.py); the guard, the fetch and img2dataset are real.
"""

from __future__ import annotations

import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from datagen import url_guard
from datagen.folder import MANIFEST, folder_key, ingest_folder
from datagen.hostile import hostile_cases
from datagen.ingest import guarded_download_image
from datagen.shards import list_shards, read_index
from tests.conftest import snapshot
from tests.datagen.conftest import png_bytes
from tests.pipelines.standin_server import BEHAVIOURS, StandInServer
from unicap.captioner import CaptionConfig, Captioner
from unicap.contract import caption as caption_record
from unicap.contract import shards as shard_contract
from unicap.engines import EngineConfig, ServerEngine

SEED = 20261130
PUBLIC, PUBLIC_2 = "93.184.215.14", "93.184.215.15"
SECRET = "SECRET-MARKER-outside-the-folder"
TOTALS: dict[str, tuple[int, int]] = {}  # part -> (inputs, kinds): printed at the end (pytest -s)


def _record(part: str, items: list, kinds: set) -> None:
    TOTALS[part] = (len(items), len(kinds))
    print(f"[fuzz] {part}: {len(items)} hostile inputs of {len(kinds)} kinds; totals so far {TOTALS}")


# ----------------------------------------------------------------------------- URL lists

INTERNAL_LITERALS = [
    "127.0.0.1",
    "10.0.0.7",
    "172.16.5.4",
    "192.168.1.1",
    "169.254.169.254",
    "100.64.0.1",
    "0.0.0.0",
    "198.18.0.1",
    "224.0.0.1",
    "[::1]",
    "[::ffff:127.0.0.1]",
    "[2002:7f00:1::]",
    "[fc00::1]",
    "[fe80::1]",
    "[::]",
    "[2001:0:4136:e378:8000:63bf:80ff:fffe]",
    "[64:ff9b::a00:1]",
]
BAD_HOSTS = [
    "x" * 64 + ".example",
    "a..b.example",
    "exa mple.example",
    "xn--.example",
    "-\u0000-.example",
    "b\u00fccher.invalid",
    "\u2488.example",
    "h\u3002example",
]
SCHEMES = [
    "file:///etc/passwd",
    "ftp://127.0.0.1/a.png",
    "data:image/png;base64,iVBORw0KGgo=",
    "javascript:alert(1)",
    "gopher://127.0.0.1:70/",
    "ws://127.0.0.1/",
    "mailto:a@b.example",
    "//public.example/a.png",
    "/etc/passwd",
    "",
    "   ",
]


def hostile_urls(rng: random.Random, a: str, n: int, *, public: bool) -> list[tuple[str, str]]:
    """(kind, url) pairs. `a` serves the routes; with `public`, names resolve through the stand-in
    resolver (public.example -> a public address played by server a)."""
    origin = "http://public.example:{port}" if public else a
    port = a.rsplit(":", 1)[1]
    origin = origin.format(port=port)

    def to(target: str) -> str:
        return f"{origin}/to?u={target}"

    makers = {
        "ok": lambda i: f"{origin}/img/{i}.png",
        "ok_unicode_path": lambda i: f"{origin}/img/caf\u00e9-{i}.png",
        "not_found": lambda i: f"{origin}/missing/{i}.png",
        "redirect_ok": lambda i: to(f"http://public2.example:{port}/img/r{i}.png" if public else f"{a}/img/r{i}.png"),
        "redirect_relative": lambda i: to(f"/img/rel{i}.png"),
        "redirect_internal": lambda i: to(f"http://{rng.choice(INTERNAL_LITERALS)}:{port}/img/x.png"),
        "redirect_internal_name": lambda i: to(f"http://internal.example:{port}/img/x.png"),
        "redirect_scheme": lambda i: to(rng.choice(SCHEMES[:7])),
        "redirect_loop": lambda i: f"{origin}/loop",
        "redirect_bad_host": lambda i: to(f"http://{rng.choice(BAD_HOSTS)}/a.png"),
        "internal_literal": lambda i: f"http://{rng.choice(INTERNAL_LITERALS)}:{port}/img/{i}.png",
        "internal_name": lambda i: f"http://internal.example:{port}/img/{i}.png",
        "rebinding_name": lambda i: f"http://rebind{i}.example:{port}/img/{i}.png",
        "bad_idna": lambda i: f"http://{rng.choice(BAD_HOSTS)}/{i}.png",
        "scheme": lambda i: rng.choice(SCHEMES),
        "very_long": lambda i: f"{origin}/img/{'a' * rng.randint(8200, 20000)}.png",
        "unparsable": lambda i: rng.choice(
            ["http://[::1", "http://h:99999/a", "http://h:port/a", "http://", "http:///a"]
        ),
        "control_chars": lambda i: f"{origin}/img/a\r\nX-Injected: 1/{i}.png",
        "credentials": lambda i: f"http://user:pass@{'public.example:' + port if public else a[7:]}/img/c{i}.png",
        "trickle": lambda i: f"{origin}/trickle",
    }
    kinds = list(makers)
    out = [(k, makers[k](i)) for i, k in enumerate(kinds)]  # every kind at least once
    weights = [0.3 if k == "trickle" else 1.0 for k in kinds]
    out += [(k, makers[k](i)) for i, k in enumerate(rng.choices(kinds, weights, k=n - len(kinds)), start=len(kinds))]
    return out


# kinds that may be fetched (control characters are percent-encoded into the path: no header injection)
FETCHABLE = {
    "ok",
    "ok_unicode_path",
    "redirect_ok",
    "redirect_relative",
    "credentials",
    "rebinding_name",
    "control_chars",
}
INTERNAL = {
    "internal_literal",
    "internal_name",
    "redirect_internal",
    "redirect_internal_name",
}  # with --allow-private


class StandInNetwork:
    """STAND-IN for DNS and the internet: *.example names resolve as configured, and every connection
    is carried to local server `a` (or `b` for 127.0.0.2). Records the addresses connected to."""

    def __init__(self, monkeypatch, a_addr: str):
        self.a_addr = a_addr
        self.connected: list[str] = []
        self.calls: dict[str, int] = {}
        real_open = url_guard.open_socket

        def open_socket(address, port, timeout):
            self.connected.append(address)
            return real_open("127.0.0.2" if address == "127.0.0.2" else self.a_addr, port, timeout)

        monkeypatch.setattr(url_guard, "open_socket", open_socket)
        monkeypatch.setattr(url_guard, "system_resolver", self.resolve)

    def resolve(self, host: str, port: int) -> list[str]:
        n = self.calls[host] = self.calls.get(host, 0) + 1
        if host == "public.example":
            return [PUBLIC]
        if host == "public2.example":
            return [PUBLIC_2]
        if host == "internal.example":
            return ["10.0.0.5"]
        if host.startswith("rebind"):
            return [PUBLIC] if n == 1 else ["127.0.0.2"]  # public when checked, internal afterwards
        raise OSError(-2, "Name or service not known")


@pytest.mark.parametrize("allow_private", [False, True])
def test_url_guard_fuzz_every_url_one_outcome(local_web, monkeypatch, allow_private):
    """Hostile URLs through img2dataset's download hook (in-process, 16 threads), public names played locally."""
    a, b = local_web
    net = StandInNetwork(monkeypatch, "127.0.0.1")
    rng = random.Random(SEED + allow_private)
    urls = hostile_urls(rng, a.url, 400, public=True)
    b_hits = len(b.hits)
    t0 = time.monotonic()

    def download(numbered: tuple[int, tuple[str, str]]):
        i, (_, url) = numbered
        return guarded_download_image((i, url), 3.0, None, {"noai"}, allow_private=allow_private)

    with ThreadPoolExecutor(16) as pool:
        outcomes = list(pool.map(download, enumerate(urls)))
    assert time.monotonic() - t0 < 30
    assert [o[0] for o in outcomes] == list(range(len(urls)))  # every URL once, never an exception
    for (kind, url), (_, stream, error) in zip(urls, outcomes, strict=True):
        assert (stream is None) != (error is None), (kind, url, error)
        if stream is not None:
            assert kind in FETCHABLE | (INTERNAL if allow_private else set()), (kind, url)
            assert stream.read().startswith(b"\x89PNG")
        if kind in ("scheme", "redirect_scheme", "bad_idna", "redirect_bad_host", "very_long", "unparsable"):
            assert error.startswith("refused") or "not known" in error, (kind, url, error)
        if kind == "trickle":
            assert error.startswith("timed out"), error
        if kind == "redirect_loop":  # on a busy machine the deadline may come first
            assert "more than 5 redirects" in error or error.startswith("timed out"), error
        if not allow_private and kind in INTERNAL:
            assert error.startswith("refused: host"), (kind, url, error)
        if kind == "rebinding_name":  # checked public, so connected to the public address, never re-resolved
            assert stream is not None or error.startswith("timed out"), error
    if not allow_private:
        assert len(b.hits) == b_hits  # the internal server (127.0.0.2) was never reached
        assert not set(net.connected) - {PUBLIC, PUBLIC_2}  # only checked public addresses were connected to
    _record(f"urls (allow_private={allow_private})", urls, {k for k, _ in urls})


def test_url_ingest_fuzz_end_to_end(local_web, tmp_path):
    """A generated hostile list through real img2dataset (--allow-private, then without): every URL one row."""
    from unicap.cli import main as unicap

    a, b = local_web
    rng = random.Random(SEED)
    urls = [(k, u) for k, u in hostile_urls(rng, a.url, 90, public=False) if k != "trickle"][:80]
    urls += [("trickle", f"{a.url}/trickle")] * 2
    path = tmp_path / "urls.csv"
    pd.DataFrame({"url": [u for _, u in urls], "caption": [k for k, _ in urls]}).to_csv(path, index=False)
    before = snapshot(tmp_path)
    for allow, out in ((True, tmp_path / "allowed"), (False, tmp_path / "refused")):
        hits = len(a.hits) + len(b.hits)
        t0 = time.monotonic()
        args = [
            "ingest",
            str(path),
            "--out",
            str(out),
            "--caption-col",
            "caption",
            "--timeout",
            "1",
            "--shard-size",
            "30",
        ]
        assert unicap(args + (["--allow-private"] if allow else [])) == 0
        assert time.monotonic() - t0 < 40
        index = read_index(out)
        for shard in list_shards(out):
            shard_contract.validate_shard(out, shard)
        assert sorted(index.url.fillna("")) == sorted(u for _, u in urls)  # every URL exactly once
        ok = index.status == "success"
        assert index.error_message[~ok].str.len().gt(0).all() and index.error_message[ok].isna().all()
        if not allow:
            assert not ok.any() and len(a.hits) + len(b.hits) == hits  # nothing local was contacted
        else:
            assert set(index.caption[ok]) <= FETCHABLE | INTERNAL
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith(("allowed/", "refused/"))} == before
    _record("url ingest end to end (x2 runs)", urls, {k for k, _ in urls})


# ----------------------------------------------------------------------------- folders


def hostile_folder(rng: random.Random, base: Path, n: int) -> tuple[Path, dict[str, str], set[str]]:
    """A generated folder under base/photos; returns (root, image entry rel path -> kind, kinds).
    Secrets and images outside the folder live in base/outside."""
    root, outside = base / "photos", base / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret.txt").write_text(SECRET)
    (outside / "secret.png").write_bytes(png_bytes((1, 2, 3)))
    (outside / "dir").mkdir()
    (outside / "dir" / "inner.png").write_bytes(png_bytes((3, 2, 1)))
    cases = hostile_cases()
    expected: dict[str, str] = {}
    kinds_seen: set[str] = set()

    def name(i: int, ext: str = "png") -> str:
        style = rng.choice(["plain", "space", "unicode", "bytes", "newline", "upper", "deep"])
        stem = {
            "plain": f"img{i}",
            "space": f"an image {i}",
            "unicode": f"caf\u00e9-\u56fe-{i}",
            "bytes": os.fsdecode(b"raw\xff\xfe" + str(i).encode()),
            "newline": f"two\nlines{i}",
            "upper": f"UP{i}",
            "deep": f"d{i % 3}/e{i % 2}/img{i}",
        }[style]
        ext = ext.upper() if style == "upper" else ext
        return f"{stem}.{ext}"

    def write(rel: str, data: bytes) -> Path:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        return p

    def link(rel: str, target: Path, is_dir: bool = False) -> None:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.symlink_to(target, target_is_directory=is_dir)

    def fifo(rel: str) -> None:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(p)

    makers = {
        "good": lambda i: write(name(i), png_bytes((i % 200, 9, 9))),
        "good_jpeg": lambda i: write(name(i, "jpeg"), _jpeg(i)),
        "hostile_image": lambda i: write(name(i), rng.choice(cases).data),
        "zero_bytes": lambda i: write(name(i), b""),
        "not_an_image": lambda i: write(name(i), b"#!/bin/sh\nrm -rf /\n"),
        "symlink_in": lambda i: (
            link(name(i), write(f"real{i}.png", png_bytes())) or expected.__setitem__(f"real{i}.png", "good")
        ),
        "symlink_out": lambda i: link(name(i), outside / "secret.png"),
        "symlink_out_relative": lambda i: link(f"rel{i}.png", Path("../outside/secret.png")),
        "dangling": lambda i: link(name(i), outside / f"gone{i}.png"),
        "symlink_loop": lambda i: link(f"loop{i}.png", root / f"loop{i}.png"),
        "fifo_image": lambda i: fifo(name(i)),
        "sidecar_out": lambda i: (
            write(f"cap{i}.png", png_bytes()),
            link(f"cap{i}.txt", outside / "secret.txt"),
        ),
        "sidecar_fifo": lambda i: (write(f"cf{i}.png", png_bytes()), fifo(f"cf{i}.txt")),
        "sidecar_huge": lambda i: (write(f"ch{i}.png", png_bytes()), write(f"ch{i}.txt", b"x" * (2 << 20))),
        "sidecar_binary": lambda i: (
            write(f"cb{i}.png", png_bytes()),
            write(f"cb{i}.txt", bytes(range(256))),
        ),
        "unreadable": lambda i: os.chmod(write(name(i), png_bytes()), 0),  # readable to root; a row either way
        "folder_named_png": lambda i: (root / f"dir{i}.png").mkdir(),
    }
    others = {
        "fifo_no_ext": lambda i: fifo(f"pipe{i}"),
        "dir_link_out": lambda i: link(f"up{i}", outside / "dir", is_dir=True),
        "dir_link_in": lambda i: link(f"again{i}", root, is_dir=True),
        "non_image": lambda i: write(f"notes{i}.md", b"text"),
        "hidden": lambda i: write(f".hidden{i}.png", png_bytes()),
    }
    image_kinds = [k for k in makers if k != "folder_named_png"]
    plan = list(makers) + list(others)
    plan += rng.choices(list(makers) + list(others), k=n - len(plan))
    for i, kind in enumerate(plan):
        before = _entries(root)
        (makers | others)[kind](i)
        kinds_seen.add(kind)
        if kind in image_kinds:
            new = sorted(_entries(root) - before)
            for rel in new:
                if os.path.splitext(rel)[1].lower().lstrip(".") in ("png", "jpeg", "jpg") and rel not in expected:
                    expected[rel] = kind
    return root, expected, kinds_seen


def _entries(root: Path) -> set[str]:
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for f in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            out.add(os.path.relpath(os.path.join(dirpath, f), root))
    return out


def _jpeg(i: int) -> bytes:
    import io

    buf = io.BytesIO()
    Image.new("RGB", (30 + i % 7, 20), (i % 255, 1, 1)).save(buf, "JPEG")
    return buf.getvalue()


def test_folder_ingest_fuzz(tmp_path):
    rng = random.Random(SEED)
    root, expected, kinds = hostile_folder(rng, tmp_path, 160)
    out = tmp_path / "shards"
    before = snapshot(tmp_path)
    t0 = time.monotonic()
    res = ingest_folder(root, out, shard_size=25)
    assert time.monotonic() - t0 < 30
    index = read_index(out)
    keys = {folder_key(r) for r in expected}
    assert index.key.is_unique and set(index.key) == keys, set(index.key) ^ keys
    for shard in list_shards(out):
        shard_contract.validate_shard(out, shard)
    ok = index.status == "success"
    assert index.error_message[~ok].str.len().gt(0).all() and index.error_message[ok].isna().all()
    by_key = index.set_index("key")
    failing = "symlink_out symlink_out_relative dangling symlink_loop fifo_image zero_bytes not_an_image".split()
    succeeding = "good good_jpeg symlink_in sidecar_out sidecar_fifo sidecar_huge sidecar_binary".split()
    for rel, kind in expected.items():
        row = by_key.loc[folder_key(rel)]
        if kind in failing:
            assert row.status != "success", (rel, kind)
        if kind in succeeding:
            assert row.status == "success", (rel, kind, row.error_message)
    assert SECRET not in " ".join(str(c) for c in index.caption)
    for tar in out.glob("*.tar"):
        assert SECRET.encode() not in tar.read_bytes()
    assert {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("shards/")} == before
    skipped = set(res["skipped_files"])
    assert all(s.startswith(("pipe", "up", "again", "notes")) for s in skipped), skipped
    # resume: the same folder again changes nothing
    kept = snapshot(out)
    assert ingest_folder(root, out, shard_size=25) == res and snapshot(out) == kept
    assert (out / MANIFEST).exists()
    _record("folder entries", list(_entries(root)), kinds)


# ----------------------------------------------------------------------------- server answers


def test_server_answer_fuzz_every_item_one_row():
    rng = random.Random(SEED)
    behaviours = list(BEHAVIOURS.items())
    cases = hostile_cases()
    items, kinds = [], set()
    for i in range(48):
        if i < len(behaviours) or rng.random() < 0.8:
            colour, kind = behaviours[i] if i < len(behaviours) else rng.choice(behaviours)
            im = Image.new("RGB", (rng.randint(20, 90), rng.randint(20, 90)), colour)
            import io

            buf = io.BytesIO()
            im.save(buf, "PNG")
            data = buf.getvalue()
        else:
            case = rng.choice(cases)
            kind, data = f"image:{case.name}", case.data
        kinds.add(kind)
        items.append({"key": f"k{i:03d}", "shard": "00000", "image": data, "kind": kind})
    cfg = CaptionConfig(levels=("short", "tags"), languages=("en", "zh"), max_retries=1)
    with StandInServer(hang_s=3.0, trickle_s=0.2) as standin:
        engine = ServerEngine(EngineConfig(model="standin-vlm", server=standin.url, timeout_s=1.0, http_retries=1))
        t0 = time.monotonic()
        rows = Captioner(engine, cfg).caption([{k: v for k, v in it.items() if k != "kind"} for it in items])
        took = time.monotonic() - t0
    assert took < 30, took
    assert [r["key"] for r in rows] == [it["key"] for it in items]  # every item exactly once, in order
    caption_record.validate(caption_record.to_table(rows, cfg.levels, cfg.languages))
    columns = caption_record.caption_columns(cfg.levels, cfg.languages)
    for it, r in zip(items, rows, strict=True):
        if r["status"] == "ok":
            assert r["error"] is None and all(r[c] for c in columns), it["kind"]
        else:
            reasons = {caption_record.error_reason(e) for e in r["error"].split("; ")}
            assert reasons <= set(caption_record.ERROR_REASONS), (it["kind"], r["error"])
        if it["kind"] in ("trickle", "timeout"):
            assert r["status"] == "failed" and "timeout" in r["error"], r["error"]
        if it["kind"] in (
            "null_content",
            "list_content",
            "number_content",
            "huge",
            "empty_body",
            "surrogate",
            "malformed",
        ):
            assert r["status"] == "failed" and caption_record.error_reason(r["error"]) == "malformed_output", r["error"]
    _record("server answers", items, kinds)
    print(
        f"[fuzz] TOTAL: {sum(n for n, _ in TOTALS.values())} hostile inputs, {sum(k for _, k in TOTALS.values())} kinds"
    )
