"""The node-local packed cache under load: many processes, each with threads, fetching, evicting and reading the
files of one stage through one small cache folder; the bytes on disk never exceed the limit.

The source is a local folder (the cache reads any storage Location the same way), so that fetches are quick and
claims, evictions and publications interleave as often as the machine allows."""

import multiprocessing
import os
import random
import threading

from train.packed_cache import PackedCache, RemoteFile, folder_bytes
from unicap import storage

PROCESSES = 4
THREADS = 2  # per process: a reader and a prefetcher, as in a loader worker
GETS = 600  # per thread
SIZES = [1500 + 500 * i for i in range(8)]  # bytes of the stage's 8 files


def write_remote(folder) -> list[RemoteFile]:
    folder.mkdir()
    files = []
    for i, size in enumerate(SIZES):
        path = folder / f"{i:05d}.bin"
        path.write_bytes(bytes([i]) * size)
        st = path.stat()
        files.append(RemoteFile(path.name, st.st_size, st.st_mtime_ns))
    return files


def hammer(root: str, limit: int, remote: str, files: list[RemoteFile], seed: int, out) -> None:
    """One process: THREADS threads that each get GETS random files (every other one a prefetch, which may find
    the file busy or the cache full), read what they got, and measure the cache folder after each get."""
    cache, loc = PackedCache(root, limit, remote), storage.resolve(remote)
    peaks, errors = [], []

    def run(rng: random.Random) -> None:
        peak = 0
        for n in range(GETS):
            file = rng.choice(files)
            try:
                path = cache.get(loc, file, wait=n % 2 == 0)
                if path is not None:
                    with open(path, "rb") as f:
                        data = f.read()
                    assert data == bytes([files.index(file)]) * file.size, f"{path}: wrong bytes"
            except FileNotFoundError:
                pass  # evicted by another process between get and open: the loader asks again
            except Exception as e:  # noqa: BLE001 - reported to the test
                errors.append(repr(e))
            peak = max(peak, folder_bytes(root))
        peaks.append(peak)

    threads = [threading.Thread(target=run, args=(random.Random(seed * THREADS + t),)) for t in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.put((os.getpid(), max(peaks), errors))


def test_many_processes_hammering_a_small_cache_never_exceed_its_limit(tmp_path):
    files = write_remote(tmp_path / "remote")
    limit = 2 * max(SIZES) + min(SIZES)  # 2 to 4 of the 8 files: most gets evict or wait for room
    root = tmp_path / "cache"
    PackedCache(root, limit, str(tmp_path / "remote")).dir.mkdir(parents=True)
    ctx = multiprocessing.get_context("fork")  # the workers run only the cache and os: as loader workers do
    out = ctx.Queue()
    args = (str(root), limit, str(tmp_path / "remote"), files)
    procs = [ctx.Process(target=hammer, args=(*args, seed, out)) for seed in range(PROCESSES)]
    for p in procs:
        p.start()
    results = [out.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    errors = [e for _, _, errs in results for e in errs]
    assert not errors, errors[:5]
    peaks = [peak for _, peak, _ in results]
    assert max(peaks) <= limit, (peaks, limit)
    assert not [p for p in (root.rglob(".*.part-*"))], "a part file outlived its fetch"
    assert folder_bytes(root) <= limit
