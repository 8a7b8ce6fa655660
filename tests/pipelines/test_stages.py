"""Stage selection (DuckDB) on generated score tables: exact sizes, nesting, funnel, rules, resume."""

import json
import shutil

import numpy as np
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

pytest_plugins = ["tests.s3_server"]  # the fixtures s3_server, bucket, s3


@pytest.fixture(scope="module")
def scores(tmp_path_factory):
    d = tmp_path_factory.mktemp("scores")
    write_score_table(d, 6000, rows_per_file=2000, seed=4)
    # the score job's near-duplicate clusters: drop 25 otherwise good rows
    df = pd.read_parquet(d)
    good = df[(df.decode_error.isna()) & (df.caption_status == "ok") & (df.min_side >= 256)]
    near = good.key.iloc[:25].tolist()
    of = good.key.iloc[25:50].tolist()
    clusters = pa.table({"key": near, "duplicate_of": of, "kind": ["near"] * 25, "similarity": [0.99] * 25})
    write_parquet(clusters, d / "_dedup" / "duplicates.parquet")
    dedup.validate(pq.read_table(dedup.duplicates_path(d)).cast(dedup.DUP_SCHEMA))
    return d, near


def validate_manifests(out) -> list[pd.DataFrame]:
    """Every manifest follows unicap.contract.manifest; returns them as DataFrames."""
    for stage in manifest.STAGES:
        manifest.validate(pq.read_table(manifest.manifest_path(out, stage)))
    return [pd.read_parquet(manifest.manifest_path(out, s)) for s in manifest.STAGES]


def composite(df: pd.DataFrame) -> pd.Series:
    clip = df[["clip_long_en", "clip_medium_en", "clip_short_en"]].mean(axis=1)
    return 0.5 * (clip - clip.mean()) / clip.std(ddof=0) + 0.5 * (
        df.aesthetic - df.aesthetic.mean()
    ) / df.aesthetic.std(ddof=0)


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
    folders = ["--scores", str(quoted), "--output", str(tmp_path / "cli")]
    rules = ["--rule", "stage1.min_side=512", "--rule", "composite.clip_columns=[clip_short_en]"]
    assert unicap(["stages", *folders, "--stage1", "1.0", *rules]) == 0
    s1_cli, _, _ = validate_manifests(tmp_path / "cli")
    state = json.loads((tmp_path / "cli" / "_stages.json").read_text())
    assert (s1_cli.min_side >= 512).all() and state["rules"]["composite"]["clip_columns"] == ["clip_short_en"]


# ---------------------------------------------------------------- hostile score tables


def _hostile_scores(d, rows=400):
    """A clean generated table, then: NaN / inf scores, null sha256 on a quarter of the rows, and the
    last 10 keys of file 0 again in file 1 (with other scores)."""
    write_score_table(d, 2 * rows, rows_per_file=rows, seed=8)
    t0, t1 = pd.read_parquet(d / "00000.parquet"), pd.read_parquet(d / "00001.parquet")
    t0.loc[5:9, "clip_long_en"] = float("nan")
    t0.loc[10:12, "aesthetic"] = float("inf")
    t1.loc[0:2, "clip_short_en"] = float("-inf")
    t0.loc[t0.index % 4 == 1, "sha256"] = None
    t1.loc[t1.index % 4 == 1, "sha256"] = None
    t1.loc[rows - 10 :, "key"] = t0.key.iloc[rows - 10 :].to_numpy()
    t0["shard"], t1["shard"] = "00000", "00001"
    schema = score_contract.score_schema(("long", "medium", "short"), ("en",))
    for name, t in (("00000", t0), ("00001", t1)):  # from_pandas=False: a NaN stays a NaN, not a null
        cols = [pa.array(t[f.name].tolist(), f.type, from_pandas=False) for f in schema]
        write_parquet(pa.Table.from_arrays(cols, schema=schema), d / f"{name}.parquet")
    return pd.concat([t0, t1], ignore_index=True)


def test_non_finite_scores_null_sha256_and_repeated_keys_do_not_break_the_ranking(tmp_path):
    """Before: one NaN made every composite NaN, the stages were cut in key order (NaN rows included)
    and exit 0; rows without sha256 formed one exact-duplicate group (all but one removed); a key in two
    shards went into stage1 twice."""
    df = _hostile_scores(tmp_path / "scores")
    f = select_stages(tmp_path / "scores", tmp_path / "out", "1.0", "0.5", "0.5")
    s1, s2, s3 = validate_manifests(tmp_path / "out")  # unique keys, finite composite, best first
    assert f["non_finite_scores"] == {"clip_long_en": 5, "clip_short_en": 3, "aesthetic": 3}
    assert s1.composite.notna().all() and s1.key.is_unique and len(s3) > 0
    assert f["stage1_rules"]["duplicate_key"]["removed"] > 0
    assert f["pool_rows_without_sha256"] > 50  # all kept (the key set below): none is a copy of another
    # the same selection as if the NaN/inf were null (missing), computed independently
    clean = df.copy()
    for c in ("clip_long_en", "clip_short_en", "aesthetic"):
        clean.loc[~np.isfinite(clean[c]), c] = np.nan
    clean = clean[
        clean.decode_error.isna() & (clean.caption_status == "ok") & (clean.min_side >= 256) & (clean.aspect_ratio <= 4)
    ].drop_duplicates("key")  # file 0 comes first: its rows stay
    dup = clean.sha256.notna() & clean.sort_values(["min_side", "key"], ascending=[False, True]).duplicated(
        "sha256"
    ).reindex(clean.index)
    clean = clean[~dup]
    assert sorted(clean.key) == sorted(s1.key)
    clip = clean[["clip_long_en", "clip_medium_en", "clip_short_en"]].fillna(0).mean(axis=1)
    aes = clean.aesthetic.fillna(0)
    c = 0.5 * (clip - clip.mean()) / clip.std(ddof=0) + 0.5 * (aes - aes.mean()) / aes.std(ddof=0)
    best = clean.assign(c=c).sort_values(["c", "key"], ascending=[False, True])
    eligible = best[best.min_side >= 1024]
    assert set(s2.key) == set(eligible.key.head(len(s2))) and len(s2) == min(len(eligible), round(0.5 * len(s1)))


def test_scores_whose_statistics_are_not_finite_are_an_error(tmp_path):
    d = tmp_path / "scores"
    write_score_table(d, 300, rows_per_file=300, seed=9)
    t = pd.read_parquet(d / "00000.parquet")
    t["aesthetic"] = np.where(t.index % 2, 1e308, -1e308)  # finite values whose variance overflows
    t.to_parquet(d / "00000.parquet")
    with pytest.raises(ValueError, match="aesthetic scores of the pool have mean .* not finite"):
        select_stages(d, tmp_path / "out", "1.0", "0.5", "0.5")


# ---------------------------------------------------------------- object storage


def upload(local, target) -> None:
    """Every file under the local folder `local`, to the same relative paths under the Location `target`."""
    for f in sorted(p for p in local.rglob("*") if p.is_file()):
        target.join(f.relative_to(local).as_posix()).write_bytes(f.read_bytes())


def test_scores_and_stages_in_a_bucket_give_the_same_manifests(scores, tmp_path, s3, s3_server):
    """--scores, --output and --shards as URIs: the same rows in the same order as on local folders, locations
    naming the bucket's tars, funnel.json and _stages.json in the bucket, DuckDB's files kept off it."""
    from unicap import storage

    d, _ = scores
    local = select_stages(d, tmp_path / "local", "3000", "0.1", "50", shards_dir=str(tmp_path / "shards"))
    upload(d, storage.resolve(s3).join("scores"))
    out = storage.resolve(s3).join("stages")
    f = select_stages(f"{s3}/scores", out.uri, "3000", "0.1", "50", shards_dir=f"{s3}/shards")
    exact = ("seconds", "composite")  # the pool's moments may differ in the last bit (parallel sums)
    assert {k: v for k, v in f.items() if k not in exact} == {k: v for k, v in local.items() if k not in exact}
    moments = ("clip_mean", "clip_std", "aesthetic_mean", "aesthetic_std")
    assert [f["composite"][m] for m in moments] == pytest.approx([local["composite"][m] for m in moments], rel=1e-9)
    assert sorted(x.name for x in out.files()) == [
        "_stages.json",
        "funnel.json",
        *(f"{s}.parquet" for s in manifest.STAGES),
    ]
    for stage in manifest.STAGES:
        got = out.join(f"{stage}.parquet").read_parquet()
        manifest.validate(got)
        want = pq.read_table(manifest.manifest_path(tmp_path / "local", stage))
        assert got.drop_columns(["location", "composite"]).equals(want.drop_columns(["location", "composite"]))
        assert got.column("composite").to_pylist() == pytest.approx(want.column("composite").to_pylist(), rel=1e-9)
        shard = got.column("shard")[0].as_py()
        assert got.column("location")[0].as_py() == f"{s3}/shards/{shard}.tar"
    before = {x.name: x.info().mtime_ns for x in out.files()}
    s3_server.reset()
    select_stages(f"{s3}/scores", out.uri, "3000", "0.1", "50", shards_dir=f"{s3}/shards")  # up to date
    assert {x.name: x.info().mtime_ns for x in out.files()} == before
    assert s3_server.requests()["PUT", "put"] <= 2  # check_writable's probe object only


def test_a_missing_bucket_is_one_line_and_exit_status_2(s3, tmp_path, capsys):
    missing = s3.replace("s3://", "s3://no-such-") + "/scores"
    assert unicap(["stages", "--scores", missing, "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "error: " in err and "does not exist" in err and len(err.splitlines()) == 1, err
