"""Duplicate detection over a score folder: exact (sha256) and near (CLIP image embeddings).

Exact: rows sharing a sha256; DuckDB groups them out of core.
Near: embeddings are centred on the pool mean and renormalised (every CLIP embedding shares a
large common direction; removing it spreads unrelated images apart while copies stay together),
then hashed with random-hyperplane LSH (`bands` bands of `rows` sign bits). Rows that share a
band's hash are candidates; a candidate pair is a duplicate when its centred cosine is at least
`threshold`; duplicates are merged into clusters (union-find). The cost is near-linear: one
projection per image plus the candidate pairs, about N/16 random ones per band for
`rows` = log2(N) + 4. Buckets larger than `max_bucket` are compared against their first member
only (star), not all pairs. In each cluster the copy with the largest short side (then the
smallest key) is kept.

The score folder is a local folder or a URI (unicap.storage): every file is read through its Location, and
the duplicates table goes back to it (write_duplicates). Exact duplicates: DuckDB over an Arrow dataset of
the score files on the folder's filesystem (pyarrow reads, DuckDB groups out of core).

Bounded memory at pool scale (stage1 is 100M images): the embeddings are copied once into a
float16 memory-mapped file (local scratch, removed afterwards: `_dedup/.work-*/` beside a local score
folder, on its disk; a temporary folder of this machine for a folder in a bucket) and every pass
over them (mean, hashing, verification) goes in chunks; rows are integer ids (position in the
sorted embedding files), keys are read back only for the duplicates found. The band codes go to a
memmap too. What stays in RAM is ~25 bytes per row (one band's codes, sorted, and their order;
the row norms), not the N x dim embeddings nor N Python strings.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from unicap import storage
from unicap.contract.dedup import DEDUP_DIR, DUP_SCHEMA, DUPLICATES_FILE
from unicap.contract.scores import EMBED_DIR
from unicap.storage import Location

CHUNK = 1 << 13  # rows per step of a pass: 8k x 768 x 4 bytes = 25 MB of float32 (and 8k x 24 x 20 bits)
PAIR_CHUNK = 1 << 14  # candidate pairs verified per step: 2 x 16k x 768 x 4 bytes = 100 MB


# the score columns the exact step reads; a file may hold them as other types (an all-null column as null)
EXACT_SCHEMA = pa.schema(
    [("key", pa.string()), ("sha256", pa.string()), ("min_side", pa.int32()), ("decode_error", pa.string())]
)


def _visible_parquet(folder: Location) -> list[Location]:
    """The Parquet files a reader of `folder` sees: hidden (".") and private ("_") names left out."""
    return [f for f in folder.files(".parquet") if not f.name.startswith(("_", "."))]


def exact_duplicates(score_dir: str | os.PathLike | Location) -> pa.Table:
    """Rows whose sha256 another decodable row shares, each pointing at its group's kept copy."""
    import duckdb

    folder = storage.resolve(score_dir)
    files = _visible_parquet(folder)
    if not files:
        return DUP_SCHEMA.empty_table()
    # an Arrow dataset on the folder's filesystem (local disk or bucket): DuckDB scans it in batches
    scores = pads.dataset([f.path for f in files], schema=EXACT_SCHEMA, filesystem=folder.fs, format="parquet")
    con = duckdb.connect()
    con.register("scores", scores)
    # a missing sha256 (null or empty) is nobody's copy; a key in two score files is listed once
    return (
        con.sql(
            """
        SELECT key, keep AS duplicate_of, 'exact' AS kind, 1.0::FLOAT AS similarity FROM (
            SELECT key, first(key ORDER BY min_side DESC NULLS LAST, key) OVER (PARTITION BY sha256) AS keep
            FROM scores WHERE nullif(sha256, '') IS NOT NULL AND decode_error IS NULL
            QUALIFY count(*) OVER (PARTITION BY sha256) > 1
        ) WHERE key <> keep QUALIFY row_number() OVER (PARTITION BY key ORDER BY keep) = 1 ORDER BY key
        """
        )
        .to_arrow_table()
        .cast(DUP_SCHEMA)
    )


# ---------------------------------------------------------------- near duplicates (arrays)


def _centred_unit(emb, mean: np.ndarray, inv_norm: np.ndarray, idx) -> np.ndarray:
    return (emb[idx].astype(np.float32) - mean) * inv_norm[idx, None]


def _pairs_in_runs(sorted_codes: np.ndarray, order: np.ndarray, max_bucket: int):
    """(i, j) row pairs that share a code: all pairs in runs up to max_bucket, star beyond.
    Works on the run members only (few), apart from two boolean passes over the band."""
    eq = sorted_codes[1:] == sorted_codes[:-1]
    pos = np.flatnonzero(np.r_[False, eq] | np.r_[eq, False])  # members of runs of two or more
    if len(pos) == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    first = ~np.r_[False, eq][pos]  # the first member of its run
    label = np.cumsum(first) - 1
    ids, big = order[pos], np.bincount(label)[label] > max_bucket
    out_i, out_j = [], []
    star = big & ~first  # big runs: every member against the run's first member
    out_i.append(ids[first][label[star]])
    out_j.append(ids[star])
    ids, label, k = ids[~big], label[~big], 1  # small runs: members k apart inside one run, k = 1, 2, ...
    while len(ids) > k:
        same = label[k:] == label[:-k]
        if not same.any():
            break
        out_i.append(ids[:-k][same])
        out_j.append(ids[k:][same])
        k += 1
    i, j = np.concatenate(out_i), np.concatenate(out_j)
    return np.minimum(i, j), np.maximum(i, j)


def near_duplicate_pairs(
    emb,
    threshold: float = 0.95,
    bands: int = 24,
    rows: int | None = None,
    max_bucket: int = 256,
    seed: int = 0,
    valid: np.ndarray | None = None,
    workdir: Path | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row pairs (i, j, centred cosine) with cosine >= threshold, i < j, found through LSH buckets.

    emb: (N, dim) array or np.memmap (read in chunks); valid: (N,) bool, rows to consider;
    workdir: where the (bands, N) int64 band codes go as a memmap (in RAM when None)."""
    n, dim = emb.shape
    valid = np.ones(n, bool) if valid is None else valid
    empty = (np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32))
    if valid.sum() < 2:
        return empty
    total = np.zeros(dim, np.float64)
    for s in range(0, n, CHUNK):
        total += emb[s : s + CHUNK][valid[s : s + CHUNK]].astype(np.float64).sum(0)
    mean = (total / valid.sum()).astype(np.float32)
    inv_norm = np.zeros(n, np.float32)
    rows = rows or int(np.clip(np.ceil(np.log2(n)) + 4, 8, 48))
    planes = np.random.default_rng(seed).standard_normal((dim, bands * rows)).astype(np.float32)
    weights = 1 << np.arange(rows, dtype=np.int64)
    # band-major: one band's codes are contiguous for sorting
    codes = (
        np.empty((bands, n), np.int64)
        if workdir is None
        else np.lib.format.open_memmap(Path(workdir) / "codes.npy", "w+", np.int64, (bands, max(n, 1)))[:, :n]
    )
    for s in range(0, n, CHUNK):
        x = emb[s : s + CHUNK].astype(np.float32) - mean
        norm = np.linalg.norm(x, axis=1)
        inv_norm[s : s + CHUNK] = 1.0 / np.clip(norm, 1e-8, None)
        bits = (x @ planes > 0).reshape(len(x), bands, rows)
        codes[:, s : s + CHUNK] = (bits * weights).sum(-1).T
    ids = np.arange(n, dtype=np.int64)
    codes[:, ~valid] = -1 - ids[~valid]  # invalid rows: codes no other row has (real codes are >= 0)
    found_i, found_j, found_s = [], [], []
    for b in range(bands):
        band = np.asarray(codes[b])
        order = np.argsort(band, kind="stable")
        i, j = _pairs_in_runs(band[order], order, max_bucket)
        del band
        for s in range(0, len(i), PAIR_CHUNK):
            ii, jj = i[s : s + PAIR_CHUNK], j[s : s + PAIR_CHUNK]
            sim = np.einsum("nd,nd->n", _centred_unit(emb, mean, inv_norm, ii), _centred_unit(emb, mean, inv_norm, jj))
            keep = sim >= threshold
            found_i.append(ii[keep])
            found_j.append(jj[keep])
            found_s.append(sim[keep])
    if not found_i:
        return empty
    i, j, sim = np.concatenate(found_i), np.concatenate(found_j), np.concatenate(found_s)
    _, first = np.unique(i * n + j, return_index=True)  # a pair found in several bands, once
    return i[first], j[first], sim[first].astype(np.float32)


def clusters(i: np.ndarray, j: np.ndarray) -> dict[int, list[int]]:
    """Connected components of the pair graph: root row -> member rows."""
    parent: dict[int, int] = {}

    def find(a: int) -> int:
        parent.setdefault(a, a)
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b in zip(i.tolist(), j.tolist(), strict=True):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    out: dict[int, list[int]] = {}
    for a in parent:
        out.setdefault(find(a), []).append(a)
    return out


# ---------------------------------------------------------------- a score folder


class _Pool:
    """The score folder's embeddings as one float16 memmap; rows addressed by position."""

    def __init__(self, score_dir: Location, dropped: pa.Array, workdir: Path):
        self.files = _visible_parquet(score_dir.join(EMBED_DIR))
        self.score_files = [score_dir.join(f.name) for f in self.files]
        counts = [_num_rows(f) for f in self.files]
        self.offsets = np.r_[0, np.cumsum(counts)].astype(np.int64)
        n, dim = int(self.offsets[-1]), self._dim()
        self.valid = np.zeros(n, bool)
        self.emb = np.lib.format.open_memmap(workdir / "emb.npy", "w+", np.float16, (max(n, 1), max(dim, 1)))[:n]
        for f, s in zip(self.files, self.offsets[:-1], strict=True):
            t = f.read_parquet()
            col = t.column("embedding").combine_chunks()
            null = pc.is_null(col).to_numpy(zero_copy_only=False)
            gone = pc.is_in(t.column("key"), value_set=dropped).to_numpy(zero_copy_only=False)
            ok = ~null & ~gone  # exact duplicates already have their kept copy
            rows = np.flatnonzero(ok)
            if len(rows):
                block = pc.list_flatten(col.filter(pa.array(ok))).to_numpy(zero_copy_only=False).reshape(len(rows), dim)
                finite = np.isfinite(block).all(axis=1)  # a NaN embedding is no embedding
                rows, block = rows[finite], block[finite]
                self.emb[s + rows] = block
            self.valid[s + rows] = True
        self.emb.flush()

    def _dim(self) -> int:
        for f in self.files:
            lengths = pc.list_value_length(f.read_parquet(columns=["embedding"]).column("embedding")).drop_null()
            if len(lengths):
                return lengths[0].as_py()
        return 0

    def lookup(self, rows: np.ndarray, column: str) -> list:
        """`column` of the score rows at these positions (embedding and score files share row order)."""
        out = [None] * len(rows)
        file_of = np.searchsorted(self.offsets, rows, side="right") - 1
        for fi in np.unique(file_of):
            sel = np.flatnonzero(file_of == fi)
            path = self.files[fi] if column == "key" else self.score_files[fi]
            values = path.read_parquet(columns=[column]).column(column)
            taken = values.take(pa.array(rows[sel] - self.offsets[fi])).to_pylist()
            for k, v in zip(sel.tolist(), taken, strict=True):
                out[k] = v
        return out


def _num_rows(f: Location) -> int:
    with f.open_input() as handle:  # the footer only
        return pq.ParquetFile(handle).metadata.num_rows


def _scratch(score_dir: Location) -> Path:
    """A fresh local folder for the memmaps: beside a local score folder (its disk holds N x dim float16),
    else a temporary folder of this machine (TMPDIR), never in a bucket."""
    if not score_dir.is_local:
        return Path(tempfile.mkdtemp(prefix="unicap-dedup-"))
    work = score_dir.local_path / DEDUP_DIR
    work.mkdir(exist_ok=True)
    for stale in work.glob(".work-*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=".work-", dir=work))


def find_duplicates(score_dir: str | os.PathLike | Location, near_threshold: float | None = 0.95) -> pa.Table:
    """Every duplicate row of a score folder (a local folder or a URI): key, duplicate_of (the kept copy),
    kind, similarity. near_threshold None: exact duplicates only."""
    score_dir = storage.resolve(score_dir)
    exact = exact_duplicates(score_dir)
    if near_threshold is None or not _visible_parquet(score_dir.join(EMBED_DIR)):
        return exact
    workdir = _scratch(score_dir)
    try:
        pool = _Pool(score_dir, exact.column("key").combine_chunks(), workdir)
        i, j, sim = near_duplicate_pairs(pool.emb, near_threshold, valid=pool.valid, workdir=workdir)
        comps = list(clusters(i, j).values())
        members = np.array(sorted(m for c in comps for m in c), np.int64)
        keys = dict(zip(members.tolist(), pool.lookup(members, "key"), strict=True))
        side = dict(zip(members.tolist(), pool.lookup(members, "min_side"), strict=True))
        best = {}  # row -> (similarity, partner) of its strongest pair
        for a, b, s in zip(i.tolist(), j.tolist(), sim.tolist(), strict=True):
            for x, y in ((a, b), (b, a)):
                if s > best.get(x, (-2.0, None))[0]:
                    best[x] = (s, y)
        pair_sim = {(a, b): s for a, b, s in zip(i.tolist(), j.tolist(), sim.tolist(), strict=True)}
        near, listed = [], set(exact.column("key").to_pylist())
        for comp in comps:
            keep = min(comp, key=lambda r: (-(side[r] or 0), keys[r]))
            for m in sorted(comp, key=lambda r: keys[r]):
                if keys[m] != keys[keep] and keys[m] not in listed:  # a key in two shards: listed once
                    listed.add(keys[m])
                    s = pair_sim.get((min(m, keep), max(m, keep)), best[m][0])
                    near.append({"key": keys[m], "duplicate_of": keys[keep], "kind": "near", "similarity": s})
        del pool
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return pa.concat_tables([exact, pa.Table.from_pylist(near, schema=DUP_SCHEMA)])


def write_duplicates(score_dir: str | os.PathLike | Location, near_threshold: float | None = 0.95) -> pa.Table:
    """find_duplicates, written to SCORE_DIR/_dedup/duplicates.parquet (unicap.contract.dedup) through
    unicap.storage; returns the table."""
    score_dir = storage.resolve(score_dir)
    dups = find_duplicates(score_dir, near_threshold)
    score_dir.join(DEDUP_DIR, DUPLICATES_FILE).write_parquet(dups)
    return dups
