"""Stage selection (DuckDB) on generated score tables: exact sizes, nesting, funnel, rules, resume."""

import json
import shutil

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from datagen.score_tables import write_score_table
from pipelines.stages import load_rules, parse_target, select_stages
from tests.conftest import snapshot
from unicap.atomic import write_parquet
from unicap.cli import main as unicap
from unicap.contract import dedup, manifest
from unicap.contract import scores as score_contract


@pytest.fixture(scope="module")
def scores(tmp_path_factory):
    d = tmp_path_factory.mktemp("scores")
    write_score_table(d, 6000, rows_per_file=2000, seed=4)
    # the score job's near-duplicate clusters: drop 25 otherwise good rows
    df = pd.read_parquet(d)
    good = df[(df.decode_error.isna()) & (df.caption_status == "ok") & (df.min_side >= 256)]
    near = good.key.iloc[:25].tolist()
    write_parquet(pa.table({"key": near, "duplicate_of": good.key.iloc[25:50].tolist(), "kind": ["near"] * 25,
                            "similarity": [0.99] * 25}), d / "_dedup" / "duplicates.parquet")  # fmt: skip
    dedup.validate(pq.read_table(dedup.duplicates_path(d)).cast(dedup.DUP_SCHEMA))
    return d, near


def validate_manifests(out) -> list[pd.DataFrame]:
    """Every manifest follows unicap.contract.manifest; returns them as DataFrames."""
    for stage in manifest.STAGES:
        manifest.validate(pq.read_table(manifest.manifest_path(out, stage)))
    return [pd.read_parquet(manifest.manifest_path(out, s)) for s in manifest.STAGES]


def composite(df: pd.DataFrame) -> pd.Series:
    clip = df[["clip_long_en", "clip_medium_en", "clip_short_en"]].mean(axis=1)
    return 0.5 * (clip - clip.mean()) / clip.std(ddof=0) + 0.5 * (df.aesthetic - df.aesthetic.mean()) / df.aesthetic.std(ddof=0)


def test_targets_parse():
    assert parse_target("100M") == ("count", 100_000_000) and parse_target("10k") == ("count", 10_000)
    assert parse_target("5000") == ("count", 5000) and parse_target("0.1") == ("fraction", 0.1)
    with pytest.raises(ValueError, match="count"):
        parse_target("lots")


def test_sizes_nesting_funnel_and_an_independent_selection(scores, tmp_path):
    d, near = scores
    f = select_stages(d, tmp_path, "3000", "0.1", "50", shards_dir="/data/shards")
    s1, s2, s3 = (pd.read_parquet(tmp_path / f"stage{i}.parquet") for i in (1, 2, 3))
    validate_manifests(tmp_path)
    assert (len(s1), len(s2), len(s3)) == (3000, 300, 50)  # exactly the targets
    assert set(s3.key) <= set(s2.key) <= set(s1.key)
    assert (s2.min_side >= 1024).all() and s1.key.is_unique
    assert s1.location.iloc[0] == f"/data/shards/{s1.shard.iloc[0]}.tar"
    # funnel adds up
    removed = sum(r["removed"] for r in f["stage1_rules"].values())
    assert f["total"] == 6000 and f["total"] - removed == f["stage1"]["pool"]
    # bad rows never reach a stage
    df = pd.read_parquet(d)
    bad = set(df.key[df.decode_error.notna() | (df.caption_status != "ok") | (df.min_side < 256)]) | set(near)
    dup_losers = df[df.duplicated("sha256", keep=False)]
    assert not bad & set(s1.key)
    assert s1.merge(df[["key", "sha256"]]).sha256.is_unique and len(dup_losers)
    # an independent pandas selection gives the same stage2
    pool = df[~df.key.isin(bad)].sort_values(["min_side", "key"], ascending=[False, True]).drop_duplicates("sha256")
    pool = pool.assign(c=composite(pool)).sort_values(["c", "key"], ascending=[False, True])
    assert f["stage1"]["pool"] == len(pool)
    top1 = pool.head(3000)
    expected2 = top1[top1.min_side >= 1024].head(300)
    assert set(expected2.key) == set(s2.key)
    assert set(expected2.key[:50]) == set(s3.key)


def test_rules_file_and_fractions(scores, tmp_path):
    d, _ = scores
    rules_path = tmp_path / "rules.json"
    rules_path.write_text(json.dumps({"stage1": {"min_side": 512}, "stage2": {"min_side": 1280}}))
    rules = load_rules(str(rules_path))
    f = select_stages(d, tmp_path / "out", "1.0", "0.05", "0.5", rules=rules)
    s1, s2 = pd.read_parquet(tmp_path / "out" / "stage1.parquet"), pd.read_parquet(tmp_path / "out" / "stage2.parquet")
    assert (s1.min_side >= 512).all() and (s2.min_side >= 1280).all()
    assert len(s1) == f["stage1"]["pool"] and len(s2) == round(0.05 * len(s1))
    assert f["stage3"]["selected"] == round(0.5 * len(s2))
    with pytest.raises(ValueError, match="unknown rule section"):
        bad = tmp_path / "bad.json"
        bad.write_text('{"stage9": {}}')
        load_rules(str(bad))


def test_shortfall_is_reported_not_hidden(scores, tmp_path):
    d, _ = scores
    f = select_stages(d, tmp_path, "1.0", "5000", "10")
    assert f["stage2"]["selected"] == f["stage2"]["eligible_min_side"] < 5000
    assert f["stage2"]["shortfall"] == 5000 - f["stage2"]["selected"]


def test_rerun_writes_nothing_and_an_interrupted_run_is_redone(scores, tmp_path):
    d, _ = scores
    select_stages(d, tmp_path, "3000", "0.1", "50")
    before = snapshot(tmp_path)
    select_stages(d, tmp_path, "3000", "0.1", "50")
    assert snapshot(tmp_path) == before
    (tmp_path / "stage3.parquet").unlink()  # killed before the last manifest was renamed into place
    select_stages(d, tmp_path, "3000", "0.1", "50")
    assert len(pd.read_parquet(tmp_path / "stage3.parquet")) == 50
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_paths_with_quotes_and_the_command_line_rule_overrides(scores, tmp_path):
    """Paths reach DuckDB as parameters: a quote in a folder name is just a character."""
    d, _ = scores
    quoted = tmp_path / "it's scores"
    shutil.copytree(d, quoted)
    for f in sorted(quoted.glob("*.parquet")):
        score_contract.validate(pq.read_table(f))
    out = tmp_path / "o'stages"
    shards_dir = (tmp_path / "x'shards").resolve()
    f = select_stages(quoted, out, "3000", "0.1", "50", shards_dir=str(shards_dir))
    s1, s2, s3 = validate_manifests(out)
    assert (len(s1), len(s2), len(s3)) == (3000, 300, 50)
    assert s1.location.iloc[0] == f"{shards_dir}/{s1.shard.iloc[0]}.tar"
    plain = select_stages(d, tmp_path / "plain", "3000", "0.1", "50")  # the same selection as without quotes
    assert f["stage1_rules"] == plain["stage1_rules"] and f["stage1_rules"]["near_duplicate"]["removed"] > 0
    assert unicap(["stages", "--scores", str(quoted), "--output", str(tmp_path / "cli"), "--stage1", "1.0",
                   "--rule", "stage1.min_side=512", "--rule", "composite.clip_columns=[clip_short_en]"]) == 0  # fmt: skip
    s1_cli, _, _ = validate_manifests(tmp_path / "cli")
    state = json.loads((tmp_path / "cli" / "_stages.json").read_text())
    assert (s1_cli.min_side >= 512).all() and state["rules"]["composite"]["clip_columns"] == ["clip_short_en"]
