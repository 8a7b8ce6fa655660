"""Fuzz: a seeded mix of hostile shards and score tables through the real jobs, end to end.

    UNICAP_FUZZ_SEED=7 pytest tests/pipelines/test_hostile_fuzz.py   # another mix (default seed 0)

Shards (datagen.hostile_data.hostile_shards): keys the index does not list, index rows the tar lacks,
a tar cut off at a random byte, invalid {key}.json, zero-byte / non-image / bomb images, a key in two
shards, a key twice in one tar, download failures, an empty shard. They go through the caption job (a
real Ray job against the stand-in OpenAI server), the score job (tiny CLIP, with those captions) and
stage selection; then stage selection alone over hostile score tables (NaN / inf scores, null sha256,
keys in two shards, an empty file). Every input row must come out exactly once, ok or with its reason;
nothing may crash; no file outside the output folders may change; a re-run must write nothing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from datagen.hostile_data import SCORE_KINDS, SHARD_KINDS, hostile_score_tables, hostile_shards
from pipelines.caption import run_job as caption_job
from pipelines.score import ScoreConfig
from pipelines.score import run_job as score_job
from pipelines.stages import select_stages
from tests.conftest import snapshot
from tests.pipelines.standin_server import StandInServer
from unicap.atomic import visible_parquet_files
from unicap.captioner import CaptionConfig
from unicap.contract import caption as caption_record
from unicap.contract import manifest, scores
from unicap.engines import EngineConfig

# slow: the caption, score and stages jobs on Ray: make test runs it, make test-fast does not
pytestmark = pytest.mark.slow

SEED = int(os.environ.get("UNICAP_FUZZ_SEED", "0"))
LENIENT_RULES = {"stage1": {"min_side": 1, "caption_status": ["ok", "partial"]}, "stage2": {"min_side": 1}}


def normalised(error: str | None) -> str:
    """The score job's decode_error holds the decoder's own reason ("truncated: ..."); the reader's
    and the index's failures are already "undecodable_image: ..." / "download_failed: ..."."""
    if error is None or error.startswith(("undecodable_image:", "download_failed:", "processing_error:")):
        return error or "ok"
    return f"undecodable_image: {error}"


def outputs(out: Path) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(p) for p in visible_parquet_files(out)], ignore_index=True)


def unchanged(before: dict, after: dict) -> bool:
    """Equal snapshots of a job's output, apart from the job-level files rewritten by every run (_summary)."""
    keep = lambda snap: {k: v for k, v in snap.items() if not k.startswith("_")}  # noqa: E731
    return keep(before) == keep(after)


@pytest.fixture(scope="module")
def world(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    planted = hostile_shards(root / "shards", SEED)
    score_planted = hostile_score_tables(root / "hostile_scores", SEED)
    return root, planted, score_planted


def test_hostile_shards_through_caption_score_and_stages(world):
    root, planted, _ = world
    inputs = snapshot(root)
    expected = planted.expected
    kinds = planted.planted
    inputs_planted = f"{sum(kinds.values())} hostile inputs of {len(kinds)} kinds"
    print(f"\n[fuzz seed {SEED}] {inputs_planted} in {len(expected)} index rows: {kinds}")
    assert set(planted.planted) == set(SHARD_KINDS)

    # caption: every index row once per shard, ok or failed with the reason its input asks for
    captions = root / "captions"
    with StandInServer() as standin:
        cfg = EngineConfig(model="standin-vlm", server=standin.url, timeout_s=10.0, http_retries=1)
        summary = caption_job(root / "shards", captions, cfg, CaptionConfig(max_retries=0), batch_size=6)
        for p in visible_parquet_files(captions):
            caption_record.validate(pq.read_table(p))
        df = outputs(captions)
        assert sorted(zip(df.shard, df.key, strict=True)) == sorted(expected)  # each exactly once
        for row in df.itertuples():
            want = expected[(row.shard, row.key)]
            got = "ok" if row.status == "ok" else row.error
            assert got.startswith(want), (row.shard, row.key, want, got)
        refused = {p.stem: json.loads(p.read_text())["refused_samples"] for p in (captions / "_stats").glob("*.json")}
        assert refused == planted.refused and summary["refused_samples"] == sum(planted.refused.values())
        assert summary["failed_shards"] == {} and summary["rows"] == len(expected)
        before = snapshot(captions)
        again = caption_job(root / "shards", captions, cfg, CaptionConfig(max_retries=0), batch_size=6)
        assert again["last_run"]["shards_written"] == [] and unchanged(before, snapshot(captions))

    # score, with those captions: the same rows, a decode error exactly where the caption job saw one
    score_out = root / "scores"
    score_cfg = ScoreConfig(clip="tiny", batch_size=8, precision="fp32", near_dedup=False)
    score_job(root / "shards", captions, score_out, score_cfg)
    for p in visible_parquet_files(score_out):
        scores.validate(pq.read_table(p))
    sc = outputs(score_out)
    assert sorted(zip(sc.shard, sc.key, strict=True)) == sorted(expected)
    for row in sc.itertuples():
        want = expected[(row.shard, row.key)]
        got = normalised(row.decode_error)
        assert got.startswith(want if not want.startswith("download_failed") else "download_failed"), (
            row.key,
            want,
            got,
        )
    before = snapshot(score_out)
    score_job(root / "shards", captions, score_out, ScoreConfig(clip="tiny", batch_size=8, dedup=False))
    assert unchanged(before, snapshot(score_out))

    # stages over what the jobs wrote: the key in two shards goes in once, ranking finite
    f = select_stages(score_out, root / "stages", "1.0", "0.5", "0.5", rules=LENIENT_RULES)
    stage1 = pq.read_table(manifest.manifest_path(root / "stages", "stage1"))
    for stage in manifest.STAGES:
        manifest.validate(pq.read_table(manifest.manifest_path(root / "stages", stage)))
    decodable = {k for (s, k), v in expected.items() if v == "ok"}
    assert set(stage1.column("key").to_pylist()) == decodable
    shared_ok = sum(k == f"h{SEED}_shared" and v == "ok" for (_, k), v in expected.items())
    assert f["stage1_rules"]["duplicate_key"]["removed"] == max(0, shared_ok - 1)
    # nothing outside the output folders was touched
    assert snapshot(root / "shards") == {k[len("shards/") :]: v for k, v in inputs.items() if k.startswith("shards/")}
    assert {p.name for p in root.iterdir()} == {"shards", "hostile_scores", "captions", "scores", "stages"}


def test_hostile_score_tables_through_stages(world):
    root, _, planted = world
    print(f"\n[fuzz seed {SEED}] {sum(planted.values())} hostile score values/rows of {len(planted)} kinds: {planted}")
    assert set(planted) == set(SCORE_KINDS) and all(planted.values())
    inputs = snapshot(root / "hostile_scores")
    out = root / "hostile_stages"
    f = select_stages(root / "hostile_scores", out, "0.8", "0.5", "0.5", rules={"stage2": {"min_side": 300}})
    tables = [pq.read_table(manifest.manifest_path(out, s)) for s in manifest.STAGES]
    for t in tables:
        manifest.validate(t)  # unique keys, finite composite, best first
    assert all(t.num_rows for t in tables)
    bad = f["non_finite_scores"]
    clip = {"clip_long_en": planted["nan_score"], "clip_short_en": planted["inf_score"]}
    assert bad == {**clip, "aesthetic": planted["nan_aesthetic"]}
    assert f["stage1_rules"]["duplicate_key"]["removed"] == planted["duplicate_key_across_shards"]
    assert f["pool_rows_without_sha256"] > 0
    df = outputs(root / "hostile_scores")
    assert f["total"] == len(df) and set(tables[0].column("key").to_pylist()) <= set(df.key)
    before = snapshot(out)
    select_stages(root / "hostile_scores", out, "0.8", "0.5", "0.5", rules={"stage2": {"min_side": 300}})
    assert snapshot(out) == before and snapshot(root / "hostile_scores") == inputs
