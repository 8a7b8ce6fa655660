"""Duplicate detection over a score folder: exact (sha256) and near (CLIP image embeddings).

Exact: rows sharing a sha256; DuckDB groups them out of core.
Near: embeddings are centred on the pool mean and renormalised (every CLIP embedding shares a
large common direction; removing it spreads unrelated images apart while copies stay together),
then hashed with random-hyperplane LSH (`bands` bands of `rows` sign bits). Rows that share a
band's hash are candidates; a candidate pair is a duplicate when its centred cosine is at least
`threshold`; duplicates are merged into clusters (union-find). The cost is near-linear: one
projection per image plus the candidate pairs, which stay few for `rows` ~ log2(N) + 4. Buckets
larger than `max_bucket` are compared against their first member only (star), not all pairs.
In each cluster the copy with the largest short side (then the smallest key) is kept.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from unicap.atomic import visible_parquet_files

DUP_SCHEMA = pa.schema([("key", pa.string()), ("duplicate_of", pa.string()), ("kind", pa.string()),
                        ("similarity", pa.float32())])  # fmt: skip


def _score_files(score_dir: Path) -> list[str]:
    return [str(p) for p in visible_parquet_files(score_dir)]


def exact_duplicates(score_dir: Path) -> list[dict]:
    import duckdb

    files = _score_files(score_dir)
    if not files:
        return []
    con = duckdb.connect()
    rows = con.execute(
        """
        SELECT key, first(key ORDER BY min_side DESC NULLS LAST, key) OVER (PARTITION BY sha256) AS keep
        FROM read_parquet(?) WHERE sha256 IS NOT NULL AND decode_error IS NULL
        QUALIFY count(*) OVER (PARTITION BY sha256) > 1
        """,
        [files],
    ).fetchall()
    return [{"key": k, "duplicate_of": keep, "kind": "exact", "similarity": 1.0} for k, keep in rows if k != keep]


class _UnionFind:
    def __init__(self, n: int):
        self.parent = np.arange(n)

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def near_duplicate_pairs(
    emb: np.ndarray, threshold: float = 0.95, bands: int = 24, rows: int | None = None,
    max_bucket: int = 256, seed: int = 0,
) -> list[tuple[int, int, float]]:  # fmt: skip
    """Index pairs (i, j, centred cosine) with cosine >= threshold, found through LSH buckets."""
    n = len(emb)
    if n < 2:
        return []
    x = emb.astype(np.float32)
    x = x - x.mean(0, keepdims=True)
    x /= np.linalg.norm(x, axis=1, keepdims=True).clip(1e-8)
    rows = rows or int(np.clip(np.ceil(np.log2(n)) + 4, 8, 28))
    planes = np.random.default_rng(seed).standard_normal((x.shape[1], bands * rows)).astype(np.float32)
    bits = (x @ planes > 0).reshape(n, bands, rows)
    codes = (bits * (1 << np.arange(rows, dtype=np.int64))).sum(-1)  # (n, bands)
    candidates: set[tuple[int, int]] = set()
    for b in range(bands):
        order = np.argsort(codes[:, b], kind="stable")
        sorted_codes = codes[order, b]
        starts = np.flatnonzero(np.r_[True, sorted_codes[1:] != sorted_codes[:-1]])
        ends = np.r_[starts[1:], n]
        for s, e in zip(starts, ends, strict=True):
            if e - s < 2:
                continue
            members = order[s:e]
            if len(members) > max_bucket:  # star: everyone against the first member
                candidates.update((min(members[0], m), max(members[0], m)) for m in members[1:])
            else:
                candidates.update((min(a, c), max(a, c)) for i, a in enumerate(members) for c in members[i + 1 :])
    out = []
    for i, j in candidates:
        sim = float(x[i] @ x[j])
        if sim >= threshold:
            out.append((int(i), int(j), sim))
    return out


def find_duplicates(score_dir: Path, near_threshold: float | None = 0.95) -> pa.Table:
    """Every duplicate row of a score folder: key, duplicate_of (the kept copy), kind, similarity.
    near_threshold None: exact duplicates only."""
    score_dir = Path(score_dir)
    out = exact_duplicates(score_dir)
    dropped = {d["key"] for d in out}
    emb_files = sorted((score_dir / "_embeddings").glob("*.parquet"))
    keys, embs = [], []
    for f in emb_files:
        t = pq.read_table(f)
        for k, e in zip(t.column("key").to_pylist(), t.column("embedding").to_pylist(), strict=True):
            if e is not None and k not in dropped:
                keys.append(k)
                embs.append(e)
    if near_threshold is not None and len(keys) > 1:
        min_side = {}
        for f in _score_files(score_dir):
            t = pq.read_table(f, columns=["key", "min_side"])
            min_side.update(zip(t.column("key").to_pylist(), t.column("min_side").to_pylist(), strict=True))
        pairs = near_duplicate_pairs(np.asarray(embs, dtype=np.float16), near_threshold)
        uf = _UnionFind(len(keys))
        for i, j, _ in pairs:
            uf.union(i, j)
        clusters: dict[int, list[int]] = {}
        for i in {i for p in pairs for i in p[:2]}:
            clusters.setdefault(uf.find(i), []).append(i)
        sims = {(i, j): s for i, j, s in pairs}
        for members in clusters.values():
            keep = min(members, key=lambda i: (-(min_side.get(keys[i]) or 0), keys[i]))
            for m in members:
                if m != keep:
                    s = sims.get((min(m, keep), max(m, keep)), max(v for (a, b), v in sims.items() if m in (a, b)))
                    out.append({"key": keys[m], "duplicate_of": keys[keep], "kind": "near", "similarity": s})
    return pa.Table.from_pylist(out, schema=DUP_SCHEMA)
