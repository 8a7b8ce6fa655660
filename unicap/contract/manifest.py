"""The stage manifests: the images each training stage reads, best first.

    stages/stage1.parquet, stage2.parquet, stage3.parquet   MANIFEST_SCHEMA, one row per selected image,
                                                           ordered by composite (descending), then key
    stages/funnel.json                                     rows removed per rule, per stage, shortfalls

`location` is where the image lives: `{shards}/{shard}.tar` when the selection was given the shard
folder, else the shard name. `clip_score` is the mean of the rules' clip columns; `composite` the
weighted sum of the z-scored clip and aesthetic scores the selection ranked by (pipelines.stages).
"""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow as pa

from unicap.contract.base import key_problems, missing_or_mistyped, nullable, raise_if, required

STAGES = ("stage1", "stage2", "stage3")
FUNNEL_FILE = "funnel.json"
MANIFEST_SCHEMA = pa.schema(
    [
        *required(key=pa.string()),
        *nullable(shard=pa.string(), location=pa.string(), caption_levels_ok=pa.string()),
        *nullable(width=pa.int32(), height=pa.int32(), min_side=pa.int32(), aspect_ratio=pa.float32()),
        *nullable(aesthetic=pa.float32(), clip_score=pa.float32(), composite=pa.float64()),
    ]
)
MANIFEST_COLUMNS: list[str] = MANIFEST_SCHEMA.names


def manifest_path(stages_dir: str | Path, stage: str) -> Path:
    if stage not in STAGES:
        raise ValueError(f"stage {stage!r}: use one of {STAGES}")
    return Path(stages_dir) / f"{stage}.parquet"


def validate(table: pa.Table) -> None:
    """Check a manifest: columns and types, unique keys, a finite composite on every row, best first."""
    raise_if(missing_or_mistyped(table.schema, MANIFEST_SCHEMA), "stage manifest")
    problems = key_problems(table.column("key").to_pylist())
    composite = table.column("composite").to_pylist()
    if any(c is None for c in composite):
        problems.append("rows without a composite score")
    elif not all(math.isfinite(c) for c in composite):
        problems.append("rows with a non-finite composite score (NaN/inf): the ranking is meaningless")
    else:
        order = list(zip([-c for c in composite], table.column("key").to_pylist(), strict=True))
        if order != sorted(order):
            problems.append("rows are not ordered by composite (descending), then key")
    raise_if(problems, "stage manifest")
