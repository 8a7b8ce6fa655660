"""Stage selection: a score folder -> stage1 / stage2 / stage3 manifests and a funnel.

    unicap stages --scores data/scores --output data/stages --stage1 100M --stage2 10M --stage3 1M
    unicap stages --scores ... --output ... --stage1 1.0 --stage2 0.1 --stage3 0.1 --rules rules.json

Targets are counts (5000, 10k, 10M, 1B) or fractions (0.1): stage1 of the filtered pool, stage2 of
stage1, stage3 of stage2. Sizes follow the targets exactly when the pool is large enough; a
shortfall is reported in the funnel. Rules (unicap.stage_rules.StageRules; a YAML/JSON file and
`--rule section.key=value` override its defaults):
- stage1: every row that decodes, has ok captions, a short side >= stage1.min_side, an aspect
  ratio <= stage1.max_aspect, and is not a duplicate (exact or near, from the score job); if the
  stage1 target is smaller than that pool, the best by composite score are kept. A key found in
  several score files (ingested twice) keeps one row, its first shard's (`duplicate_key` in the
  funnel); a row without sha256 is nobody's exact duplicate (NULLs never form a group).
- stage2: among stage1 rows with short side >= stage2.min_side, the best by composite score.
- stage3: the best of stage2 (nested, the default), or of stage1's stage2-eligible rows if not.
Composite = w_clip * z(mean CLIP score over the configured caption columns) + w_aesthetic *
z(aesthetic), z-scored over the stage1 pool; ties are broken by key, so selection is deterministic.
NaN and +-inf scores are missing values (as null: 0 in the mean), counted per column in the funnel
(`non_finite_scores`); statistics that are still not finite, or a non-finite composite, are an error:
a NaN composite would rank the pool in key order.

Engine: DuckDB, chosen because selection over a 100M-row table needs out-of-core sorting and
top-K with a hard memory cap: the rules' `memory_limit` bounds the whole process (DuckDB's buffer pool gets
a share of it, StageRules.duckdb_memory_limit), and DuckDB spills to `temp_directory`. The work, in passes
over the pool table: filter into it, drop repeated keys and duplicates (ranking only the keys and hashes
found twice), the moments, then one out-of-core sort that streams stage1.parquet; stage2 is the first rows
of stage1's stage2-eligible rows and stage3 the first of stage2's, read back from those files in order.
Values (rule numbers, statuses, paths) reach DuckDB as prepared-statement parameters, never as SQL
text; the only names put into SQL are clip columns, checked against the score-column pattern and quoted.
The manifests follow unicap.contract.manifest. Every output is written under a temporary name and
renamed; `_stages.json` records a fingerprint of the inputs and rules, so a re-run with nothing changed
writes nothing.

Storage: --scores, --output and --shards are local folders or URIs (unicap.storage). Local score files are
read by DuckDB's own Parquet reader; files elsewhere as an Arrow dataset on their filesystem (pyarrow reads,
DuckDB scans it in batches): the same rows, the same SQL, the same manifests. DuckDB's database file and
spill folder stay on this machine: beside a local output (as before), else in a temporary folder (TMPDIR).
The manifests are uploaded whole (an object is visible only once complete), then funnel.json, _stages.json.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from unicap import config, storage
from unicap.atomic import atomic_path
from unicap.contract import manifest
from unicap.contract.dedup import DEDUP_DIR, DUPLICATES_FILE
from unicap.stage_rules import StageRules, load_rules, parse_target, requested
from unicap.storage import Location

__all__ = ["StagesConfig", "StageRules", "load_rules", "parse_target", "print_funnel", "select_stages"]

DUCKDB_TYPES = {pa.string(): "VARCHAR", pa.int32(): "INTEGER", pa.float32(): "FLOAT", pa.float64(): "DOUBLE"}


@dataclass
class StagesConfig:
    """The `unicap stages` command line (its defaults are select_stages' too)."""

    scores: str = field(metadata={"help": "score folder (unicap score output), a local path or a URI"})
    output: str = field(metadata={"help": "folder for stage1/2/3.parquet and funnel.json (a path or a URI)"})
    stage1: str = field(default="1.0", metadata={"help": "count (100M, 5000) or fraction of the filtered pool"})
    stage2: str = field(default="0.1", metadata={"help": "count or fraction of stage1"})
    stage3: str = field(default="0.1", metadata={"help": "count or fraction of stage2"})
    rules: str | None = field(default=None, metadata={"help": "YAML/JSON file overriding the default StageRules"})
    rule: list[str] = field(
        default_factory=list, metadata={"help": "a rule override, e.g. stage1.min_side=512 (repeat)"}
    )
    shards: str | None = field(
        default=None, metadata={"help": "image shard folder, for the manifests' location column"}
    )
    threads: int | None = field(default=None, metadata={"help": "DuckDB threads (none: all cores)"})


def ident(name: str) -> str:
    """A quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def finite(name: str) -> str:
    """SQL for a score column with NaN and +-inf read as NULL (missing)."""
    return f"CASE WHEN isfinite({ident(name)}) THEN {ident(name)} END"


def _sql(con, sql: str, params: dict | None = None):
    """Run `sql` with the named parameters ($name) it uses; values never become SQL text."""
    used = {k: v for k, v in (params or {}).items() if re.search(rf"\${k}\b", sql)}
    return con.execute(sql, used) if used else con.execute(sql)


def _parquet_files(folder: Location) -> list[pafs.FileInfo]:
    """The visible Parquet files of a folder ("." and "_" names left out), sorted, with their size and
    mtime: one listing (on a bucket, one LIST request per 1000 files, no HEAD per file)."""
    selector = pafs.FileSelector(folder.path, allow_not_found=True)
    infos = [i for i in folder.fs.get_file_info(selector) if i.type == pafs.FileType.File]
    return sorted(
        (i for i in infos if i.base_name.endswith(".parquet") and not i.base_name.startswith(("_", "."))),
        key=lambda i: i.base_name,
    )


def _fingerprint(files: list[tuple[str, pafs.FileInfo]], rules: StageRules, targets: list) -> str:
    """The rules, the targets and every input file's URI, size and mtime (local: in nanoseconds)."""
    h = hashlib.sha256(json.dumps([config.to_dict(rules), [str(t) for t in targets]], sort_keys=True).encode())
    for uri, info in files:
        h.update(f"{uri}:{info.size}:{info.mtime_ns}".encode())
    return h.hexdigest()


def _register(con, name: str, folder: Location, infos: list[pafs.FileInfo]) -> None:
    """A DuckDB view `name` over these Parquet files of `folder`, columns united by name: DuckDB's own reader
    for a local folder, an Arrow dataset on the folder's filesystem (a bucket) otherwise, registered for
    this session. Paths never become SQL text."""
    paths = [i.path for i in infos]
    if folder.is_local:
        con.read_parquet(paths, union_by_name=True).create_view(name)
        return
    schemas = []
    for path in paths:  # the footers only
        with folder.fs.open_input_file(path) as f:
            schemas.append(pads.ParquetFileFormat().make_fragment(f).physical_schema)
    schema = pa.unify_schemas(schemas, promote_options="permissive")
    con.register(name, pads.dataset(paths, schema=schema, filesystem=folder.fs, format="parquet"))


@contextlib.contextmanager
def _scratch(output: Location) -> Iterator[Path]:
    """DuckDB's local folder (database file, spill): beside a local output, else a temporary folder here,
    removed afterwards."""
    if output.is_local:
        yield output.local_path
        return
    with tempfile.TemporaryDirectory(prefix="unicap-stages-") as scratch:
        yield Path(scratch)


def _manifest_location(output: Location, stage: str) -> Location:
    return output.join(manifest.manifest_path("", stage).name)


def _publish(local: Path, target: Location) -> None:
    """A finished local file to a non-local Location: one streamed upload (a multipart upload on S3), which
    becomes visible only when complete; the manifests can be larger than memory wants to hold."""
    pafs.copy_files(str(local), target.path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=target.fs)


def _write_manifest(con, query: str, params: dict, target: Location, scratch: Path) -> tuple[Path, int]:
    """The query's rows, streamed by DuckDB into the stage's manifest (under a temporary name, renamed; or to a
    local file, then uploaded); returns that local file, for the next stage to read, and its row count."""
    copy = f"COPY ({query}) TO $path (FORMAT PARQUET)"
    if target.is_local:
        with atomic_path(target.path) as tmpfile:
            rows = _sql(con, copy, {**params, "path": str(tmpfile)}).fetchone()[0]
        return target.local_path, rows
    local = scratch / target.name
    rows = _sql(con, copy, {**params, "path": str(local)}).fetchone()[0]
    _publish(local, target)
    return local, rows


def _view(con, name: str, manifest_file: Path) -> None:
    """A view over a manifest just written, whose rows DuckDB reads in file order (best first, insertion order
    preserved): the next stage is a LIMIT of it, no second sort."""
    con.read_parquet(str(manifest_file)).create_view(name)


def _manifest_select(shards_dir: str | None) -> str:
    """The manifest's columns (unicap.contract.manifest), each cast to its contract type."""
    cols = []
    for f in manifest.MANIFEST_SCHEMA:
        if f.name != "location":
            expr = ident(f.name)
        elif shards_dir:
            expr = "$location_prefix || shard || '.tar'"  # the shard's full path
        else:
            expr = "shard"
        cols.append(f"CAST({expr} AS {DUCKDB_TYPES[f.type]}) AS {ident(f.name)}")
    return ", ".join(cols)


def select_stages(
    scores: str | os.PathLike | Location,
    output: str | os.PathLike | Location,
    stage1: str = StagesConfig.stage1,
    stage2: str = StagesConfig.stage2,
    stage3: str = StagesConfig.stage3,
    *,
    rules: StageRules | dict | None = None,
    shards_dir: str | None = None,
    threads: int | None = None,
) -> dict:
    import duckdb

    scores, output = storage.resolve(scores), storage.resolve(output)
    for loc, check in ((scores, storage.check_readable), (output, storage.check_writable)):
        if not loc.is_local:
            check(loc)  # a missing bucket or refused credentials: one line, before any work
    rules = config.from_dict(StageRules, rules) if isinstance(rules, dict) else (rules or StageRules())
    targets = [parse_target(t) for t in (stage1, stage2, stage3)]
    files = _parquet_files(scores)
    if not files:
        raise FileNotFoundError(f"no score Parquet files in {scores}")
    dup_folder = scores.join(DEDUP_DIR)
    dup_files = [i for i in _parquet_files(dup_folder) if i.base_name == DUPLICATES_FILE]
    inputs = [(scores.join(i.base_name).uri, i) for i in files] + [
        (dup_folder.join(DUPLICATES_FILE).uri, i) for i in dup_files
    ]
    fp = _fingerprint(inputs, rules, targets)
    state_path = output.join("_stages.json")
    if (
        state_path.exists()
        and state_path.read_json().get("fingerprint") == fp
        and all(_manifest_location(output, s).exists() for s in manifest.STAGES)
    ):
        funnel = output.join(manifest.FUNNEL_FILE).read_json()
        print(f"stages: {output} is up to date with {scores}; nothing written")
        return funnel
    output.mkdir()
    t0 = time.time()
    with _scratch(output) as scratch:
        tmp, dbfile = scratch / ".duckdb_tmp", scratch / ".stages.duckdb"
        dbfile.unlink(missing_ok=True)
        con = duckdb.connect(str(dbfile))  # file-backed: tables larger than memory_limit live on disk
        con.execute("SET memory_limit = ?", [rules.duckdb_memory_limit()])  # a share of the rules' limit
        con.execute("SET temp_directory = ?", [str(tmp)])
        # insertion order is kept (DuckDB's default): the pool's rows are in file order, so its moments, summed on
        # one thread, are the same every run (a parallel sum differs in the last bit, enough to swap two rows whose
        # composites differ by 1e-14); a manifest read back streams in file order (a stage is a LIMIT of the one
        # before); late materialization would fetch a LIMIT's rows by row number, re-sort them and lose the no-null
        # statistics the Parquet writer marks columns required by
        con.execute("SET disabled_optimizers = 'late_materialization'")
        if threads:
            con.execute("SET threads = ?", [int(threads)])
        # views over the files as relations: paths never become SQL text
        _register(con, "scores", scores, files)
        if dup_files:
            _register(con, "dup_files", dup_folder, dup_files)
            con.execute("CREATE VIEW dups AS SELECT key, kind FROM dup_files")
        else:
            con.execute("CREATE VIEW dups AS SELECT NULL::VARCHAR AS key, NULL::VARCHAR AS kind WHERE false")
        cols = set(con.execute("SELECT * FROM scores LIMIT 0").fetchdf().columns)
        # clip columns are checked against the score-column pattern (StageRules) and quoted
        clip_cols = [c for c in rules.composite.clip_columns if c in cols]
        score_cols = clip_cols + (["aesthetic"] if "aesthetic" in cols else [])
        # NaN and inf are missing values (one NaN made every composite NaN and the ranking key order)
        clip_sum = " + ".join(f"coalesce({finite(c)}, 0)" for c in clip_cols)
        clip_expr = f"({clip_sum}) / {len(clip_cols)}" if clip_cols else "0.0"
        aes_expr = f"coalesce({finite('aesthetic')}, 0.0)" if "aesthetic" in cols else "0.0"
        r1 = rules.stage1
        # the SQL's named parameters ($name)
        p = dict(statuses=list(r1.caption_status), min_side1=int(r1.min_side), max_aspect=float(r1.max_aspect))
        p.update(min_side2=int(rules.stage2.min_side), min_side3=rules.stage3.min_side)
        p.update(location_prefix=f"{storage.resolve(shards_dir).uri}/" if shards_dir else None)
        conditions = [
            ("undecodable", "decode_error IS NULL"),
            ("caption_not_ok", "list_contains($statuses, caption_status)"),
            ("below_min_side", "min_side >= $min_side1"),
            ("extreme_aspect", "aspect_ratio <= $max_aspect"),
        ]
        cumulative = [" AND ".join(c for _, c in conditions[: i + 1]) for i in range(len(conditions))]
        passing = ", ".join(f"count(*) FILTER (WHERE {c})" for c in cumulative)
        non_finite = "".join(f", count(*) FILTER (WHERE NOT isfinite({ident(c)}))" for c in score_cols)
        counts = _sql(con, f"SELECT count(*), {passing}{non_finite} FROM scores", p).fetchone()
        total, remaining = counts[0], list(counts[1 : 1 + len(cumulative)])
        bad_values = dict(zip(score_cols, counts[1 + len(cumulative) :], strict=True))
        aesthetic = finite("aesthetic") if "aesthetic" in cols else "NULL::FLOAT"
        kept = "key, shard, nullif(sha256, '') AS sha256, caption_levels_ok, width, height, min_side, aspect_ratio"
        scored = f"{aesthetic} AS aesthetic, {clip_expr} AS clip_score, {aes_expr} AS aes"
        _sql(con, f"CREATE TABLE pool AS SELECT {kept}, {scored} FROM scores WHERE {cumulative[-1]}", p)
        # a key in two shards' score files (ingested twice): one row, the first shard's, so a manifest never
        # names a key twice; the full order makes the choice deterministic. Only the keys found twice are ranked
        # (a hash aggregate finds them): a window over every row would sort the whole pool, all its columns
        con.execute("""DELETE FROM pool WHERE rowid IN (SELECT rowid FROM (SELECT rowid, row_number() OVER
                       (PARTITION BY key ORDER BY shard, min_side DESC, width, height, sha256, caption_levels_ok,
                        aspect_ratio, aesthetic, clip_score) AS rn FROM pool
                        WHERE key IN (SELECT key FROM pool GROUP BY key HAVING count(*) > 1)) WHERE rn > 1)""")
        conditions.append(("duplicate_key", ""))
        remaining.append(con.execute("SELECT count(*) FROM pool").fetchone()[0])
        null_sha256 = con.execute("SELECT count(*) FROM pool WHERE sha256 IS NULL").fetchone()[0]
        if r1.drop_duplicates:
            # exact: among rows that pass the filters above, keep one per sha256 (largest short side, then key);
            # a row without a sha256 is nobody's copy (NULLs would otherwise form one big group). Keys are unique
            # now, so a row is its rowid; only the sha256 values found twice are ranked
            con.execute("""DELETE FROM pool WHERE rowid IN (SELECT rowid FROM (SELECT rowid, row_number() OVER
                           (PARTITION BY sha256 ORDER BY min_side DESC, key) AS rn FROM pool WHERE sha256 IN
                           (SELECT sha256 FROM pool WHERE sha256 IS NOT NULL GROUP BY sha256 HAVING count(*) > 1))
                           WHERE rn > 1)""")
            conditions.append(("exact_duplicate", ""))
            remaining.append(con.execute("SELECT count(*) FROM pool").fetchone()[0])
            # near: the score job's clusters (unicap.dedup)
            con.execute("DELETE FROM pool WHERE key IN (SELECT key FROM dups WHERE kind = 'near')")
            conditions.append(("near_duplicate", ""))
            remaining.append(con.execute("SELECT count(*) FROM pool").fetchone()[0])
        funnel = {
            "total": total,
            "stage1_rules": {},
            "targets": [str(t) for t in (stage1, stage2, stage3)],
            "non_finite_scores": {c: n for c, n in bad_values.items() if n},  # rows, per column: read as missing
            "pool_rows_without_sha256": null_sha256,  # kept, never exact duplicates of each other
        }
        prev = total
        for (name, _), n in zip(conditions, remaining, strict=True):
            funnel["stage1_rules"][name] = {"removed": prev - n, "remaining": n}
            prev = n
        pool = prev
        # the deletes' version data stays in memory until a checkpoint, the sort below wants that memory
        con.execute("CHECKPOINT")
        moments = "avg(clip_score), coalesce(stddev_pop(clip_score), 0), avg(aes), coalesce(stddev_pop(aes), 0)"
        workers = con.execute("SELECT current_setting('threads')").fetchone()[0]
        con.execute("SET threads = 1")  # in the pool's (file) order: the same sums every run
        mc, sc, ma, sa = con.execute(f"SELECT {moments} FROM pool").fetchone()
        con.execute("SET threads = ?", [int(workers)])
        for name, mean, std in (("clip", mc, sc), ("aesthetic", ma, sa)):
            if not all(v is None or math.isfinite(v) for v in (mean, std)):
                con.close()
                raise ValueError(
                    f"stages: the {name} scores of the pool have mean {mean} and std {std}: not finite "
                    f"(values too large to rank by); check the score files in {scores}"
                )
        w = rules.composite
        p.update(w_clip=float(w.clip), clip_mean=float(mc or 0), clip_std=float(sc or 0))
        p.update(w_aes=float(w.aesthetic), aes_mean=float(ma or 0), aes_std=float(sa or 0))
        z_clip = "((clip_score - $clip_mean) / $clip_std)" if sc and sc > 0 else "0.0"
        z_aes = "((aes - $aes_mean) / $aes_std)" if sa and sa > 0 else "0.0"
        # the composite is computed where it is read (never stored: an UPDATE of every pool row is slow and holds
        # its undo data in memory), the same expression on the same values every time
        ranked = f"SELECT *, CAST($w_clip * {z_clip} + $w_aes * {z_aes} AS DOUBLE) AS composite FROM pool"
        unranked = _sql(con, f"SELECT count(*) FROM ({ranked}) WHERE NOT isfinite(composite)", p).fetchone()[0]
        if unranked:  # cannot happen with finite inputs and statistics; never rank by NaN silently
            con.close()
            raise ValueError(f"stages: {unranked} pool rows have a non-finite composite score; check {scores}")

        # stage1 is the one full sort (out of core); each later stage is a prefix of the manifest before it (or of
        # its stage2-eligible rows), read back in file order: a streamed filter and LIMIT, no second sort
        select = _manifest_select(shards_dir)
        best_first = "ORDER BY composite DESC, key"
        want = [0, 0, 0]
        want[0] = requested(targets[0], pool)
        n1 = min(want[0], pool)
        limit1 = "LIMIT $n" if n1 < pool else ""  # a LIMIT of the whole pool would only cost a check
        query1 = f"SELECT {select} FROM ({ranked}) {best_first} {limit1}"
        con.execute("SET preserve_insertion_order = false")  # an ORDER BY is written in its order either way
        s1, size1 = _write_manifest(con, query1, {**p, "n": n1}, _manifest_location(output, "stage1"), scratch)
        con.execute("SET preserve_insertion_order = true")
        _view(con, "s1", s1)
        where2 = "WHERE min_side >= $min_side2"
        eligible2 = _sql(con, f"SELECT count(*) FROM s1 {where2}", p).fetchone()[0]
        want[1] = requested(targets[1], n1)
        n2 = min(want[1], eligible2)
        query2 = f"SELECT * FROM s1 {where2} LIMIT $n"
        s2, size2 = _write_manifest(con, query2, {**p, "n": n2}, _manifest_location(output, "stage2"), scratch)
        _view(con, "s2", s2)
        base3 = "s2" if rules.nested else f"(SELECT * FROM s1 {where2})"
        want[2] = requested(targets[2], n2)
        n3 = min(want[2], n2 if rules.nested else eligible2)
        where3 = "WHERE min_side >= $min_side3" if rules.stage3.min_side else ""
        query3 = f"SELECT * FROM {base3} {where3} LIMIT $n"
        _, size3 = _write_manifest(con, query3, {**p, "n": n3}, _manifest_location(output, "stage3"), scratch)
        sizes = [size1, size2, size3]
        picked = [{"target": t, "selected": n, "shortfall": max(0, t - n)} for t, n in zip(want, sizes, strict=True)]
        composite = dict(clip_columns=clip_cols, clip_mean=mc, clip_std=sc, aesthetic_mean=ma, aesthetic_std=sa)
        funnel.update(
            stage1={"pool": pool, **picked[0]},
            stage2={"eligible_min_side": eligible2, "removed_below_min_side": sizes[0] - eligible2, **picked[1]},
            stage3=picked[2],
            composite=composite,
            seconds=round(time.time() - t0, 2),
        )
        con.close()
        dbfile.unlink(missing_ok=True)
        output.join(manifest.FUNNEL_FILE).write_json(funnel)
        state_path.write_json({"fingerprint": fp, "scores": scores.uri, "rules": config.to_dict(rules)})
    return funnel


def print_funnel(f: dict) -> None:
    print(f"stages: {f['total']} scored rows")
    if f.get("non_finite_scores"):
        print(f"  ! non-finite scores (NaN/inf), read as missing: {f['non_finite_scores']}")
    if f.get("pool_rows_without_sha256"):
        print(f"  ! {f['pool_rows_without_sha256']} pool rows without sha256: kept, not exact-deduplicated")
    for name, r in f["stage1_rules"].items():
        print(f"  - {name:16s} removed {r['removed']:>10}  remaining {r['remaining']:>10}")
    print(f"  stage1: {f['stage1']['selected']} (target {f['stage1']['target']})")
    s2, s3 = f["stage2"], f["stage3"]
    below = f"{s2['removed_below_min_side']} below min side"
    print(f"  stage2: {s2['selected']} (target {s2['target']}, {below}, shortfall {s2['shortfall']})")
    print(f"  stage3: {s3['selected']} (target {s3['target']}, shortfall {s3['shortfall']})")


def add_arguments(p: argparse.ArgumentParser) -> None:
    config.add_arguments(p, StagesConfig, skip=["rule"])
    rule_help = StagesConfig.__dataclass_fields__["rule"].metadata["help"]
    p.add_argument("--rule", action="append", default=[], metavar="SECTION.KEY=VALUE", help=rule_help)


def run(args: argparse.Namespace) -> int:
    cfg = config.from_args(StagesConfig, args)
    targets = (cfg.stage1, cfg.stage2, cfg.stage3)
    rules = load_rules(cfg.rules, cfg.rule)
    f = select_stages(cfg.scores, cfg.output, *targets, rules=rules, shards_dir=cfg.shards, threads=cfg.threads)
    print_funnel(f)
    print(f"  manifests: {cfg.output}/stage{{1,2,3}}.parquet  funnel: {cfg.output}/funnel.json")
    return 0


if __name__ == "__main__":
    from unicap.cli import module_main

    sys.exit(module_main("pipelines.stages"))
