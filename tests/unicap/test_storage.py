"""unicap.storage against a real S3 server (moto over HTTP) and a local folder, with the same tests where the
behaviour is the same: resolve, read/write, listings, atomic publication, pickling to another process, the
preflight errors a user sees (missing bucket, missing/refused credentials, read-only, unreachable), retries."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import free_port
from unicap import atomic, storage
from unicap.storage import Location, StorageError

pytest_plugins = ["tests.s3_server"]  # the fixtures s3_server, bucket, s3
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> Location:
    """An empty folder: under tmp_path, or under a fresh bucket on the S3 server."""
    if request.param == "local":
        return storage.resolve(tmp_path / "root")
    return storage.resolve(request.getfixturevalue("s3")).join("root")


def names(locations: list[Location]) -> list[str]:
    return [loc.name for loc in locations]


# ---------------------------------------------------------------- resolve


def test_resolve_round_trips(root):
    child = root.join("a", "b.parquet")
    assert child.uri == f"{root.uri}/a/b.parquet" and str(child) == child.uri
    assert child.name == "b.parquet" and child.parent.name == "a"
    assert child.parent.parent == root
    assert storage.resolve(str(child)) == child and storage.resolve(child) is child
    assert storage.resolve(child.uri + "/").path == child.path  # a trailing slash names the same place
    assert len({child, storage.resolve(child.uri), root}) == 2  # hashable, by place
    assert root.is_local == (not root.uri.startswith("s3://"))


def test_resolve_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    loc = storage.resolve("out/run1")
    assert loc.is_local and loc.path == str(tmp_path / "out/run1") == loc.uri
    assert storage.resolve(f"file://{tmp_path}/out/run1") == loc
    assert storage.resolve(Path("out") / "run1") == loc and loc.local_path == tmp_path / "out/run1"


def test_resolve_s3_uris(s3):
    loc = storage.resolve(f"{s3}/prefix/")
    assert (loc.path, loc.uri) == (f"{s3[5:]}/prefix", f"{s3}/prefix")
    assert loc.parent.uri == s3 and loc.parent.parent.uri == s3  # a bucket's root is its own parent
    with pytest.raises(StorageError, match="not a URI"):
        _ = loc.local_path
    with pytest.raises(StorageError, match="needs a bucket"):
        storage.resolve("s3://")


def test_unknown_scheme_names_the_supported_ones():
    with pytest.raises(StorageError, match=r"unknown storage scheme 'nosuch://'.*s3://.*gs://") as e:
        storage.resolve("nosuch://x/y")
    assert "\n" not in str(e.value)


def test_s3_settings_come_from_the_environment(s3, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:1")
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    monkeypatch.setenv("UNICAP_STORAGE_RETRIES", "3")
    loc = storage.resolve(f"{s3}/x")
    assert loc.fs.settings == ("127.0.0.1:1", "http", "eu-west-3", 3)
    assert storage.resolve(f"{s3}/y").fs is loc.fs  # one filesystem per (endpoint, region, retries)
    assert pickle.loads(pickle.dumps(loc)).fs.settings == loc.fs.settings  # the retry strategy survives pickling
    options = storage.storage_options(loc)
    assert options["client_kwargs"] == {"endpoint_url": "http://127.0.0.1:1", "region_name": "eu-west-3"}
    assert "testing" not in json.dumps(options)  # never the credentials
    monkeypatch.setenv("UNICAP_STORAGE_RETRIES", "lots")
    with pytest.raises(StorageError, match="UNICAP_STORAGE_RETRIES"):
        storage.resolve(f"{s3}/z")


# ---------------------------------------------------------------- reading and writing


def test_write_then_read(root, tmp_path):
    table = pa.table({"key": ["a", "b"], "n": [1, 2]}).replace_schema_metadata({"unicap": "v1"})
    root.join("blob.bin").write_bytes(b"\x00\x01")
    root.join("note.txt").write_text("héllo")
    root.join("stats.json").write_json({"b": 1, "a": [1, 2]})
    root.join("sub", "t.parquet").write_parquet(table)
    assert root.join("blob.bin").read_bytes() == b"\x00\x01" and root.join("blob.bin").size() == 2
    assert root.join("note.txt").read_text() == "héllo"
    assert root.join("stats.json").read_json() == {"a": [1, 2], "b": 1}
    local_json = atomic.write_json({"b": 1, "a": [1, 2]}, tmp_path / "format.json")
    assert root.join("stats.json").read_text() == local_json.read_text()  # the format unicap.atomic writes
    back = root.join("sub", "t.parquet").read_parquet()
    assert back.to_pydict() == table.to_pydict() and back.schema.metadata[b"unicap"] == b"v1"
    assert root.join("sub", "t.parquet").read_parquet(columns=["n"]).column_names == ["n"]
    assert pq.ParquetFile(root.join("sub", "t.parquet").open_input()).metadata.num_rows == 2


def test_listing_order_and_suffixes(root):
    for name in ["b.parquet", "a.parquet", "c.json", "sub/d.parquet", ".a.parquet.tmp-1a2b3c4d"]:
        root.join(name).write_bytes(b"x")
    assert root.listdir() == [".a.parquet.tmp-1a2b3c4d", "a.parquet", "b.parquet", "c.json", "sub"]
    assert names(root.files()) == ["a.parquet", "b.parquet", "c.json"]  # files only, hidden names left out
    assert names(root.files(".parquet")) == ["a.parquet", "b.parquet"] == names(root.glob("*.parquet"))
    deep = root.files(".parquet", recursive=True)
    assert [loc.uri for loc in deep] == [f"{root.uri}/{n}" for n in ["a.parquet", "b.parquet", "sub/d.parquet"]]
    assert deep[2].read_bytes() == b"x"
    assert root.join("missing").listdir() == [] and root.join("missing").files() == []


def test_exists_is_file_is_dir(root):
    root.join("sub", "deeper", "f.txt").write_text("x")
    sub = root.join("sub")
    assert sub.exists() and sub.is_dir() and not sub.is_file()  # on S3 a prefix with an object is a folder
    f = sub.join("deeper", "f.txt")
    assert f.exists() and f.is_file() and not f.is_dir()
    missing = root.join("nothing")
    assert not missing.exists() and not missing.is_dir() and not missing.is_file()
    with pytest.raises(FileNotFoundError):
        missing.size()
    f.delete()
    f.delete()  # a missing file is fine
    assert not f.exists()
    root.join("made").mkdir()  # a no-op on a bucket, a folder on disk
    assert root.join("made").is_dir() == root.is_local


def test_successful_writes_leave_no_temporaries(root):
    for i in range(3):
        root.join("out.json").write_json({"i": i})
    root.join("t.parquet").write_parquet(pa.table({"x": [1]}))
    assert root.listdir() == ["out.json", "t.parquet"] and root.join("out.json").read_json() == {"i": 2}


def test_a_write_that_fails_midway_publishes_nothing(root):
    old = pa.table({"x": [1, 2, 3]})
    target = root.join("t.parquet")
    target.write_parquet(old)
    # pyarrow raises inside the Parquet writer, after the output is open; a naive write would leave an empty
    # Parquet file on S3 (the stream completes on close) and lose the old file on disk.
    with pytest.raises(ValueError, match="Row group size"):
        target.write_parquet(pa.table({"x": [9]}), row_group_size=0)
    assert target.read_parquet().equals(old) and root.listdir() == ["t.parquet"]
    if root.is_local:
        assert atomic.remove_stale_temporaries(root.path) == 0


def test_a_location_pickles_to_another_process(s3, s3_server, tmp_path):
    local, remote = storage.resolve(tmp_path), storage.resolve(s3).join("run")
    for loc in (local, remote):
        loc.join("hello.txt").write_text(f"hi from {loc.uri}")
    child = (
        "import pickle, sys\n"
        "for loc in pickle.loads(sys.stdin.buffer.read()):\n"
        "    print(type(loc.fs).__name__, getattr(loc.fs, 'settings', ('-',))[-1], loc.join('hello.txt').read_text())\n"
        "    loc.join('from_child.json').write_json({'ok': True})\n"
    )
    s3_server.reset()
    run = [sys.executable, "-c", child]
    out = subprocess.run(run, input=pickle.dumps([local, remote]), capture_output=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    counts = s3_server.requests()  # counted by the server, whichever process asked
    assert counts["PUT", "put"] == 1 and counts["GET", "get"] == 1
    lines = out.stdout.decode().splitlines()
    assert lines == [f"LocalFileSystem - hi from {local.uri}", f"S3FileSystem 8 hi from {remote.uri}"]
    assert local.join("from_child.json").read_json() == remote.join("from_child.json").read_json() == {"ok": True}


def test_memory_scheme_through_fsspec():
    loc = storage.resolve(f"memory://unicap-test-{uuid.uuid4().hex[:8]}/run")  # fsspec's memory is process-wide
    loc.join("a.json").write_json({"a": 1})
    loc.join("t.parquet").write_parquet(pa.table({"x": [1, 2]}))
    assert loc.listdir() == ["a.json", "t.parquet"] and loc.is_dir()
    assert loc.join("a.json").uri == f"{loc.uri}/a.json" and loc.uri.startswith("memory://unicap-test-")
    assert loc.join("a.json").read_json() == {"a": 1} and loc.join("t.parquet").read_parquet().num_rows == 2
    assert pickle.loads(pickle.dumps(loc)).join("a.json").read_json() == {"a": 1}


def test_request_counter_sees_one_put_and_one_get(s3, s3_server):
    loc = storage.resolve(s3).join("small.bin")
    s3_server.reset()
    loc.write_bytes(b"0123456789")
    assert s3_server.requests() == {("PUT", "put"): 1}  # a small file is one PutObject, no multipart upload
    s3_server.reset()
    assert loc.read_bytes() == b"0123456789"
    assert s3_server.requests()["GET", "get"] == 1 and s3_server.requests()["PUT", "put"] == 0


def test_pandas_reads_with_storage_options(s3):
    loc = storage.resolve(s3).join("t.parquet")
    loc.write_parquet(pa.table({"x": [1, 2, 3]}))
    frame = pd.read_parquet(loc.uri, storage_options=storage.storage_options(loc))
    assert frame["x"].tolist() == [1, 2, 3]
    assert storage.storage_options(storage.resolve("/tmp")) == {}


# ---------------------------------------------------------------- preflight errors


def test_checks_pass_on_a_usable_location(root):
    storage.check_writable(root.join("new", "run"))
    root.join("in.txt").write_text("x")
    storage.check_readable(root.join("in.txt"))
    storage.check_readable(root)
    assert root.join("new", "run").listdir() == []  # the write probe is gone
    with pytest.raises(StorageError, match="no such file or folder"):
        storage.check_readable(root.join("absent"))


def test_check_writable_refuses_a_path_under_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match="is a file, not a folder"):
        storage.check_writable(tmp_path / "file" / "run")


def test_missing_bucket_is_named(s3):
    for check in (storage.check_readable, storage.check_writable):
        with pytest.raises(StorageError, match="the bucket 'unicap-no-such-bucket' does not exist"):
            check("s3://unicap-no-such-bucket/run")


def test_missing_credentials_name_the_variables_and_no_value(s3, monkeypatch, tmp_path):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "half-configured-secret")  # the key id alone is missing
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    storage.clear_filesystem_cache()
    for check in (storage.check_readable, storage.check_writable):
        with pytest.raises(StorageError, match="no storage credentials found.*AWS_ACCESS_KEY_ID") as e:
            check(f"{s3}/run")
        assert "half-configured-secret" not in str(e.value) and "AWS_SECRET_ACCESS_KEY" in str(e.value)


def use_credentials(monkeypatch, key_id: str, secret: str) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    storage.clear_filesystem_cache()


def test_refused_credentials_and_read_only(s3, s3_server, monkeypatch):
    storage.resolve(s3).join("run", "in.txt").write_text("x")
    writer = s3_server.create_user(["s3:*"])
    reader = s3_server.create_user(["s3:Get*", "s3:List*", "s3:Head*"])  # moto names actions by API operation
    run = f"{s3}/run"
    with s3_server.iam_enforced():
        use_credentials(monkeypatch, "AKIAUNKNOWNKEY000000", "wrong-secret-value")
        with pytest.raises(StorageError, match=r"refused the credentials \(INVALID_ACCESS_KEY_ID\)") as e:
            storage.check_readable(run)
        assert "AWS_ACCESS_KEY_ID" in str(e.value) and "wrong-secret-value" not in str(e.value)
        use_credentials(monkeypatch, writer[0], "wrong-secret-value")
        with pytest.raises(StorageError, match=r"refused the credentials \(SIGNATURE_DOES_NOT_MATCH\)"):
            storage.check_writable(run)
        use_credentials(monkeypatch, *reader)
        storage.check_readable(run)
        with pytest.raises(StorageError, match="read-only"):
            storage.check_writable(run)
        use_credentials(monkeypatch, *writer)
        storage.check_writable(run)


def test_unreachable_endpoint_fails_fast(s3, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    storage.clear_filesystem_cache()
    start = time.monotonic()
    with pytest.raises(StorageError, match=r"cannot reach 127\.0\.0\.1"):
        storage.check_readable(f"{s3}/run")
    assert time.monotonic() - start < 10


# ---------------------------------------------------------------- retries


def flaky(failures: list[BaseException]):
    """A function that raises each of `failures` in turn, then returns "done"; .calls counts the calls."""

    def fn():
        fn.calls += 1
        if failures:
            raise failures.pop(0)
        return "done"

    fn.calls = 0
    return fn


def test_with_retries_retries_transient_errors_only():
    transient = [ConnectionResetError("connection reset by peer"), OSError("AWS Error SLOW_DOWN (HTTP status 503)")]
    fn = flaky(transient)
    assert storage.with_retries(fn, base_s=0.001) == "done" and fn.calls == 3
    for permanent in (FileNotFoundError("gone"), OSError("AWS Error ACCESS_DENIED"), ValueError("bad")):
        fn = flaky([permanent])
        with pytest.raises(type(permanent)):
            storage.with_retries(fn, base_s=0.001)
        assert fn.calls == 1
    fn = flaky([TimeoutError("timed out")] * 5)
    with pytest.raises(TimeoutError):
        storage.with_retries(fn, attempts=3, base_s=0.001)
    assert fn.calls == 3
