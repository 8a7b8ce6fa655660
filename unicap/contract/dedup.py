"""The duplicates table: every duplicate row of a score folder and the copy that is kept in its place.

    scores/_dedup/duplicates.parquet    key, duplicate_of (the kept copy), kind, similarity

kind "exact": the same sha256 (similarity 1.0); kind "near": CLIP embeddings whose centred cosine is at
least the job's threshold (unicap.dedup). Each duplicate key appears once; the kept copies are not listed
as duplicates of their own group (a kept exact copy may still be a near duplicate of another image).
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from unicap.contract.base import key_problems, missing_or_mistyped, raise_if

DEDUP_DIR = "_dedup"
DUPLICATES_FILE = "duplicates.parquet"
KINDS = ("exact", "near")
DUP_SCHEMA = pa.schema(
    [("key", pa.string()), ("duplicate_of", pa.string()), ("kind", pa.string()), ("similarity", pa.float32())]
)


def duplicates_path(score_dir: str | Path) -> Path:
    return Path(score_dir) / DEDUP_DIR / DUPLICATES_FILE


def validate(table: pa.Table) -> None:
    """Check a duplicates table: schema, each duplicate once, never its own kept copy, known kinds,
    exact pairs at similarity 1, near pairs within [-1, 1]."""
    raise_if(missing_or_mistyped(table.schema, DUP_SCHEMA), "duplicates")
    problems = key_problems(table.column("key").to_pylist())
    if pc.any(pc.fill_null(pc.equal(table.column("key"), table.column("duplicate_of")), False)).as_py():
        problems.append("a row is its own duplicate_of")
    if table.column("duplicate_of").null_count:
        problems.append("null duplicate_of")
    kinds = set(table.column("kind").to_pylist())
    if kinds - set(KINDS):
        problems.append(f"kind {sorted(kinds - set(KINDS), key=str)} not in {KINDS}")
    sim, exact = table.column("similarity"), pc.equal(table.column("kind"), "exact")
    if pc.any(pc.fill_null(pc.and_(exact, pc.not_equal(sim, 1.0)), False)).as_py():
        problems.append("exact duplicates with similarity != 1")
    lo, hi = pc.min_max(sim).values()
    if lo.is_valid and (lo.as_py() < -1.001 or hi.as_py() > 1.001):
        problems.append(f"similarity outside [-1, 1]: {lo.as_py()}..{hi.as_py()}")
    raise_if(problems, "duplicates")
