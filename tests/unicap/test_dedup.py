import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from unicap import storage
from unicap.contract import dedup as dedup_contract
from unicap.dedup import _pairs_in_runs, clusters, find_duplicates, near_duplicate_pairs, write_duplicates
from unicap.storage import StorageError

pytest_plugins = ["tests.s3_server"]  # the fixtures s3_server, bucket, s3


def brute_pairs(codes, max_bucket):
    want = set()
    for c in np.unique(codes):
        members = sorted(np.flatnonzero(codes == c).tolist())
        if len(members) > max_bucket:
            want |= {(min(members[0], m), max(members[0], m)) for m in members[1:]}
        else:
            want |= {(a, b) for x, a in enumerate(members) for b in members[x + 1 :]}
    return want


def test_pairs_in_runs_equal_brute_force_with_star_buckets():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 40, 300)
    codes[:30] = 7  # one big bucket, compared as a star
    order = np.argsort(codes, kind="stable")
    i, j = _pairs_in_runs(codes[order], order, max_bucket=12)
    got = set(zip(i.tolist(), j.tolist(), strict=True))
    assert len(got) == len(i)  # no pair twice
    assert got == brute_pairs(codes, 12)


def planted(n=3000, dim=48, copies=40, seed=0):
    """Unrelated Gaussian embeddings plus `copies` noisy copies of the first rows (cos ~0.99)."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n, dim)).astype(np.float32)
    dup = base[:copies] + 0.1 * rng.standard_normal((copies, dim)).astype(np.float32)
    return np.concatenate([base, dup]).astype(np.float16)


def brute_near(emb, threshold):
    x = emb.astype(np.float32)
    x = x - x.mean(0)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sim = np.triu(x @ x.T, 1)
    return set(zip(*np.nonzero(sim >= threshold), strict=True))


def test_near_pairs_equal_brute_force_in_ram_and_memmapped(tmp_path):
    emb = planted()
    want = brute_near(emb, 0.95)
    assert len(want) == 40
    i, j, sim = near_duplicate_pairs(emb, 0.95)
    assert set(zip(i.tolist(), j.tolist(), strict=True)) == want
    assert (sim >= 0.95).all()
    i2, j2, sim2 = near_duplicate_pairs(emb, 0.95, workdir=tmp_path)
    assert (i2 == i).all() and (j2 == j).all() and np.allclose(sim2, sim)
    valid = np.ones(len(emb), bool)
    valid[3000] = False  # the copy of row 0 is left out
    i3, j3, _ = near_duplicate_pairs(emb, 0.95, valid=valid)
    assert set(zip(i3.tolist(), j3.tolist(), strict=True)) == want - {(0, 3000)}


def test_clusters_join_chains():
    comps = sorted(sorted(c) for c in clusters(np.array([1, 2, 7]), np.array([2, 5, 9])).values())
    assert comps == [[1, 2, 5], [7, 9]]


def write_pool(root, emb, sha, min_side, shard_size=500):
    """A score folder as the score job writes it: {shard}.parquet + _embeddings/{shard}.parquet."""
    (root / "_embeddings").mkdir(parents=True)
    n = len(emb)
    for s in range(0, n, shard_size):
        rows = range(s, min(n, s + shard_size))
        keys = [f"k{r:05d}" for r in rows]
        shard = f"{s // shard_size:05d}.parquet"
        score = {"key": keys, "sha256": [sha[r] for r in rows], "min_side": [min_side[r] for r in rows]}
        pq.write_table(pa.table({**score, "decode_error": [None] * len(keys)}), root / shard)
        vectors = [None if r == 10 else emb[r].tolist() for r in rows]  # row 10: undecodable, no embedding
        embeddings = pa.array(vectors, pa.list_(pa.float16()))
        pq.write_table(pa.table({"key": keys, "embedding": embeddings}), root / "_embeddings" / shard)


def test_find_duplicates_over_a_score_folder(tmp_path):
    emb = planted(n=1500, copies=3)  # rows 1500..1502 copy rows 0..2
    sha = [f"h{r}" for r in range(len(emb))]
    sha[20] = sha[21] = "same"  # exact copies (identical bytes)
    emb[21] = emb[20]
    min_side = [256] * len(emb)
    min_side[1501] = 512  # the copy of row 1 is larger: it is kept
    write_pool(tmp_path, emb, sha, min_side)
    (tmp_path / "_dedup" / ".work-killed").mkdir(parents=True)  # what a killed run leaves
    dups = find_duplicates(tmp_path, 0.95).to_pandas()
    got = {(r.key, r.duplicate_of, r.kind) for r in dups.itertuples()}
    assert got == {
        ("k01500", "k00000", "near"),
        ("k00001", "k01501", "near"),
        ("k01502", "k00002", "near"),
        ("k00021", "k00020", "exact"),
    }
    assert (dups.similarity >= 0.95).all()
    assert list((tmp_path / "_dedup").iterdir()) == []  # the memmap work folder is gone
    exact_only = find_duplicates(tmp_path, None).to_pandas()
    assert list(exact_only.key) == ["k00021"]
    assert pd.api.types.is_float_dtype(dups.similarity)


def test_missing_sha256_nan_embeddings_and_a_key_in_two_shards(tmp_path):
    """Rows without sha256 all shared one exact group (null = null): 242 of 243 such rows were dropped.
    A NaN embedding must not join any cluster; a key found in two shards must not be its own copy."""
    emb = planted(n=600, copies=2)  # rows 600, 601 copy rows 0, 1
    sha = [None if r % 3 else "" if r % 2 else f"h{r}" for r in range(len(emb))]  # two thirds null, some ""
    emb[30] = np.nan
    write_pool(tmp_path, emb, sha, [256] * len(emb), shard_size=301)
    # shard 00001 also holds k00000 (the same image, ingested twice) and the copy of row 1
    t = pq.read_table(tmp_path / "00001.parquet").to_pandas()
    e = pq.read_table(tmp_path / "_embeddings" / "00001.parquet").to_pandas()
    t.loc[0, "key"] = e.loc[0, "key"] = "k00000"
    e.at[0, "embedding"] = emb[0].tolist()
    pq.write_table(pa.Table.from_pandas(t, preserve_index=False), tmp_path / "00001.parquet")
    schema = pa.schema([("key", pa.string()), ("embedding", pa.list_(pa.float16()))])
    table = pa.Table.from_pandas(e, preserve_index=False).cast(schema)
    pq.write_table(table, tmp_path / "_embeddings" / "00001.parquet")
    dups = find_duplicates(tmp_path, 0.95)
    dedup_contract.validate(dups)  # each key once, never its own duplicate_of
    got = {(r["key"], r["duplicate_of"], r["kind"]) for r in dups.to_pylist()}
    assert got == {("k00600", "k00000", "near"), ("k00601", "k00001", "near")}, got


def upload(local, target) -> None:
    """Every file under the local folder `local`, to the same relative paths under the Location `target`."""
    for f in sorted(p for p in local.rglob("*") if p.is_file()):
        target.join(f.relative_to(local).as_posix()).write_bytes(f.read_bytes())


def test_a_score_folder_in_a_bucket_gives_the_same_duplicates(tmp_path, s3, s3_server):
    """Exact (DuckDB over an Arrow dataset on S3) and near (embeddings read per file) from a bucket; the table
    is written back to the bucket, and the memmaps stay on this machine (nothing but the table is put)."""
    emb = planted(n=900, copies=3)
    sha = [f"h{r}" for r in range(len(emb))]
    sha[20] = sha[21] = "same"
    write_pool(tmp_path / "scores", emb, sha, [256] * len(emb), shard_size=300)
    local = write_duplicates(tmp_path / "scores", 0.95)
    bucket = storage.resolve(s3).join("scores")
    upload(tmp_path / "scores", bucket)
    s3_server.reset()
    remote = write_duplicates(s3 + "/scores", 0.95)
    assert remote.equals(local) and remote.num_rows == 4
    written = bucket.join(dedup_contract.DEDUP_DIR, dedup_contract.DUPLICATES_FILE)
    assert written.read_parquet().equals(pq.read_table(dedup_contract.duplicates_path(tmp_path / "scores")))
    assert s3_server.requests()["PUT", "put"] == 1  # the duplicates table only: no scratch in the bucket
    assert [f.name for f in bucket.join(dedup_contract.DEDUP_DIR).files(recursive=True)] == ["duplicates.parquet"]


def test_an_unknown_scheme_is_a_one_line_error():
    with pytest.raises(StorageError, match="unknown storage scheme 'nope://'"):
        find_duplicates("nope://scores")
