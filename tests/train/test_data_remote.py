"""The loader over a packed stage in a bucket (data.packed = "s3://..."), on the test S3 server: the same batches
as over the local folder (2 ranks, a resume), a node-local cache that never fetches a cached file again and stays
under its limit, bad data and failed fetches skipped and counted, bad input refused in one line."""

import shutil
import subprocess
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from tests.train.conftest import MB, ok_keys, write_stage
from train import packed_cache
from train.batch_plan import BatchPlanner
from train.config import DataConfig
from train.data import make_loader
from train.packed_cache import folder_bytes
from train.packed_stage import NotAPackedStage, PackedStage, check_packed
from unicap import storage
from unicap.contract import packed
from unicap.storage_errors import StorageError

pytest_plugins = ["tests.s3_server"]

ROWS = [14, 11, 0, 9]  # per file; file 00002 has only failed rows


@pytest.fixture(scope="module")
def local_stage(tmp_path_factory):
    return write_stage(tmp_path_factory.mktemp("packed"), rows_per_file=ROWS)


def upload(local, uri: str, skip: tuple[str, ...] = ()) -> str:
    dest = storage.resolve(uri)
    for f in sorted(local.iterdir()):
        if f.name not in skip:
            dest.join(f.name).write_bytes(f.read_bytes())
    return uri


def cfg_for(packdir, **kw) -> DataConfig:
    return DataConfig(packed=str(packdir), resolution=64, micro_batch=MB, **kw)


def take(loader, n: int) -> list[dict]:
    it = iter(loader)
    return [next(it) for _ in range(n)]


def same_batches(a: list[dict], b: list[dict]) -> None:
    for x, y in zip(a, b, strict=True):
        assert (x["g"], x["keys"], x["captions"], x["skip_reasons"]) == (
            y["g"],
            y["keys"],
            y["captions"],
            y["skip_reasons"],
        )
        assert torch.equal(x["images"], y["images"])


def quiet(s3_server) -> None:
    """Wait until no request has come for 0.3 s (loaders of earlier tests may have a fetch in flight), then reset."""
    before = s3_server.requests()
    for _ in range(50):
        time.sleep(0.3)
        now = s3_server.requests()
        if now == before:
            break
        before = now
    s3_server.reset()


def gets(s3_server) -> int:
    return sum(n for (_, kind), n in s3_server.requests().items() if kind == "get")


def test_remote_stage_gives_the_local_batches_on_two_ranks_and_after_a_resume(local_stage, s3, tmp_path):
    uri = upload(local_stage, f"{s3}/stage1")
    n = BatchPlanner(PackedStage(local_stage), MB, 0).batches_per_epoch
    remote = cfg_for(uri, num_workers=2, cache_dir=str(tmp_path / "cache"))
    for start in (0, 5):  # from the beginning, and a resume at global batch 5
        for rank in range(2):
            want = take(make_loader(cfg_for(local_stage, num_workers=0), 0, rank, 2, start), n // 2 + 2)
            got = take(make_loader(remote, 0, rank, 2, start), n // 2 + 2)  # into the second epoch
            same_batches(got, want)
            assert {b["g"] for b in got} == set(range(start + rank, start + rank + 2 * len(got), 2))
    assert PackedStage(uri).fingerprint == PackedStage(local_stage).fingerprint


def test_a_cached_file_is_never_fetched_again(local_stage, s3, s3_server, tmp_path):
    uri = upload(local_stage, f"{s3}/stage1")
    cfg = cfg_for(uri, num_workers=0, cache_dir=str(tmp_path / "cache"))
    n = BatchPlanner(PackedStage(local_stage), MB, 0).batches_per_epoch
    loader = make_loader(cfg, seed=0, rank=0, world_size=1)
    quiet(s3_server)
    first = take(loader, n)
    shards_with_rows = sum(1 for r in ROWS if r)
    assert gets(s3_server) == 2 * shards_with_rows  # each tar and index once; the empty shard's never
    # a second epoch, then another loader on the same cache (the next run on this node), with workers
    s3_server.reset()
    take(loader, n)
    loader = make_loader(cfg_for(uri, num_workers=2, cache_dir=str(tmp_path / "cache")), seed=0, rank=0, world_size=1)
    s3_server.reset()
    again = take(loader, 2 * n)
    assert gets(s3_server) == 0, s3_server.requests()
    same_batches(again[:n], first)


def test_the_next_batches_files_are_fetched_ahead_of_their_batch(local_stage, s3, tmp_path):
    uri = upload(local_stage, f"{s3}/stage1")
    stage = PackedStage(uri)
    planner = BatchPlanner(stage, MB, 0)
    upcoming = {planner.ref(g).file for g in range(1, 4)} - {planner.ref(0).file}
    assert upcoming, "the seed gives the next batches other files"
    cache_dir = tmp_path / "cache"
    cfg = cfg_for(uri, num_workers=0, cache_dir=str(cache_dir), cache_prefetch=3, cache_gb=1.0)  # room for all
    loader = make_loader(cfg, 0, 0, 1)
    take(loader, 1)  # batch 0 only: its files, and in the background those of batches 1..3
    wanted = {n for f in upcoming for n in packed.shard_files(stage.files[f])}
    deadline = time.monotonic() + 20
    while not wanted <= cached_names(cache_dir) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert wanted <= cached_names(cache_dir)


def cached_names(cache_dir) -> set[str]:
    return {p.name.rsplit(".", 1)[0] for p in cache_dir.rglob("*") if p.is_file() and not p.name.startswith(".")}


def test_a_cache_smaller_than_the_stage_stays_under_its_limit(local_stage, s3, tmp_path):
    """Two ranks with two workers each (4 processes and their prefetch threads) share one cache folder."""
    uri = upload(local_stage, f"{s3}/stage1")
    stage = PackedStage(uri)
    limit = int(2.5 * stage.file_bytes.max())  # about 2 of the 3 shards with rows
    assert limit < stage.file_bytes.sum()
    cache_dir = tmp_path / "cache"
    cfg = cfg_for(uri, num_workers=2, cache_dir=str(cache_dir), cache_gb=limit / packed_cache.GB)
    n = BatchPlanner(stage, MB, 0).batches_per_epoch
    ranks = [iter(make_loader(cfg, seed=0, rank=r, world_size=2)) for r in range(2)]
    keys, sizes = Counter(), []
    for g in range(n):
        keys.update(next(ranks[g % 2])["keys"])
        sizes.append(folder_bytes(cache_dir))
    assert max(sizes) <= limit, (sizes, limit)  # folder_bytes counts under the cache's lock: an exact measure
    assert set(keys) == ok_keys(local_stage) and set(keys.values()) == {1}


def test_a_corrupt_tar_and_a_failed_fetch_are_counted_skips(local_stage, s3, tmp_path):
    root = tmp_path / "bad"
    shutil.copytree(local_stage, root)
    index = packed.read_index(root).to_pylist()
    bad = next(r for r in index if r["status"] == "ok" and r["shard"] == "00000")
    with open(packed.tar_path(root, "00000"), "r+b") as f:
        f.seek(bad["offset"])
        f.write(b"\0" * bad["size"])  # one image's bytes corrupted in the bucket's copy
    uri = upload(root, f"{s3}/stage1")
    cfg = cfg_for(uri, num_workers=2, cache_dir=str(tmp_path / "cache"))
    loader = make_loader(cfg, seed=0, rank=0, world_size=1)
    storage.resolve(uri).join("00001.tar").delete()  # gone after start-up: its fetch fails
    n = BatchPlanner(PackedStage(local_stage), MB, 0).batches_per_epoch
    batches = take(loader, n)
    reasons = Counter()
    for b in batches:
        reasons.update(b["skip_reasons"])
    assert reasons == {"undecodable_image": 1, "fetch_failed": ROWS[1]}
    served = {k for b in batches for k in b["keys"]}
    assert served == {k for k in ok_keys(local_stage) if not k.startswith("f00001")} - {bad["key"]}


def test_bad_input_is_refused_in_one_line(local_stage, s3, tmp_path, monkeypatch):
    def refused(error, match: str, **kw) -> None:
        with pytest.raises(error, match=match) as e:
            make_loader(cfg_for(uri, cache_dir=str(tmp_path / "cache"), **kw), seed=0, rank=0, world_size=1)
        assert "\n" not in str(e.value) and isinstance(e.value, ValueError)

    uri = upload(local_stage, f"{s3}/nometa", skip=(packed.PACK_META,))
    refused(NotAPackedStage, "is not a packed stage \\(no _pack.json\\)")
    with pytest.raises(NotAPackedStage):
        check_packed(uri)

    uri = upload(local_stage, f"{s3}/stage1")
    check_packed(uri)
    biggest = int(PackedStage(uri).file_bytes.max())
    refused(ValueError, "smaller than one micro-batch's files .* set data.cache_gb >= ", cache_gb=biggest / 2e9)
    refused(ValueError, "data.cache_gb -1", cache_gb=-1)

    def fake_full_disk(path):  # a mock: no test can fill this machine's disk
        return shutil._ntuple_diskusage(10**12, 10**12, 0)

    with monkeypatch.context() as patch:
        patch.setattr(packed_cache.shutil, "disk_usage", fake_full_disk)
        refused(ValueError, "0 GB free for the cache, which needs .* GB for the whole stage")

    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    storage.clear_filesystem_cache()
    refused(StorageError, "no storage credentials found")


def test_a_file_is_fetched_once_by_concurrent_readers_and_a_dead_fetch_is_reclaimed(
    local_stage, s3, s3_server, tmp_path
):
    uri = upload(local_stage, f"{s3}/stage1")
    stage = PackedStage(uri)
    tar = stage.remote[packed.tar_name("00000")]
    cache = packed_cache.PackedCache(tmp_path / "cache", 10**9, uri)
    cache.dir.mkdir(parents=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    part = cache.dir / f".{tar.entry}.part-{cache.host}-{dead.pid}"  # a fetch whose process was killed
    part.write_bytes(b"\0" * tar.size)
    s3_server.reset()
    with ThreadPoolExecutor(8) as pool:
        paths = set(pool.map(lambda _: cache.get(stage.loc, tar), range(8)))
    assert len(paths) == 1 and gets(s3_server) == 1 and not part.exists()
    assert paths.pop().read_bytes() == packed.tar_path(local_stage, "00000").read_bytes()
