"""Stage selection: a score folder -> stage1 / stage2 / stage3 manifests and a funnel.

    unicap stages --scores data/scores --output data/stages --stage1 100M --stage2 10M --stage3 1M
    unicap stages --scores ... --output ... --stage1 1.0 --stage2 0.1 --stage3 0.1 --rules rules.json

Targets are counts (5000, 10k, 10M, 1B) or fractions (0.1): stage1 of the filtered pool, stage2 of
stage1, stage3 of stage2. Sizes follow the targets exactly when the pool is large enough; a
shortfall is reported in the funnel. Rules (DEFAULT_RULES, overridable by a JSON/YAML file):
- stage1: every row that decodes, has ok captions, a short side >= stage1.min_side, an aspect
  ratio <= stage1.max_aspect, and is not a duplicate (exact or near, from the score job); if the
  stage1 target is smaller than that pool, the best by composite score are kept.
- stage2: among stage1 rows with short side >= stage2.min_side, the best by composite score.
- stage3: the best of stage2 (nested, the default), or of stage1's stage2-eligible rows if not.
Composite = w_clip * z(mean CLIP score over the configured caption columns) + w_aesthetic *
z(aesthetic), z-scored over the stage1 pool; ties are broken by key, so selection is deterministic.

Engine: DuckDB, chosen because selection over a 100M-row table needs out-of-core sorting and
top-K with a hard memory cap: `memory_limit` bounds it, and DuckDB spills to `temp_directory`.
Every output is written under a temporary name and renamed; `_stages.json` records a fingerprint of
the inputs and rules, so a re-run with nothing changed writes nothing.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import re
import sys
import time
from pathlib import Path

from unicap.atomic import atomic_path, visible_parquet_files, write_json

DEFAULT_RULES = {
    "stage1": {"min_side": 256, "max_aspect": 4.0, "caption_status": ["ok"], "drop_duplicates": True},
    "stage2": {"min_side": 1024},
    "stage3": {},
    "composite": {"clip": 0.5, "aesthetic": 0.5, "clip_columns": ["clip_long_en", "clip_medium_en", "clip_short_en"]},
    "nested": True,
    "memory_limit": "2GB",
}
MANIFEST_COLUMNS = ["key", "shard", "location", "caption_levels_ok", "width", "height", "min_side", "aspect_ratio",
                    "aesthetic", "clip_score", "composite"]  # fmt: skip
SUFFIX = {"k": 10**3, "m": 10**6, "b": 10**9}


def parse_target(text: str | float | int) -> tuple[str, float]:
    """"10M" -> ("count", 1e7); "0.1" -> ("fraction", 0.1); "5000" -> ("count", 5000)."""
    s = str(text).strip().lower()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kmb]?)", s)
    if not m:
        raise ValueError(f"stage target {text!r}: use a count (5000, 10k, 10M) or a fraction (0.1)")
    value, suffix = float(m.group(1)), m.group(2)
    if suffix:
        return "count", int(value * SUFFIX[suffix])
    if "." in m.group(1) and value <= 1.0:
        return "fraction", value
    return "count", int(value)


def requested(target: tuple[str, float], base: int) -> int:
    """Rows the target asks for: a count as given, a fraction of `base` (the previous stage)."""
    kind, v = target
    return int(round(v * base)) if kind == "fraction" else int(v)


def load_rules(path: str | None) -> dict:
    rules = copy.deepcopy(DEFAULT_RULES)
    if path:
        text = Path(path).read_text()
        if path.endswith((".yaml", ".yml")):
            import yaml

            user = yaml.safe_load(text) or {}
        else:
            user = json.loads(text)
        for k, v in user.items():
            if k not in rules:
                raise ValueError(f"unknown rule section {k!r} in {path}; known: {sorted(rules)}")
            if isinstance(v, dict):
                rules[k].update(v)
            else:
                rules[k] = v
    return rules


def _sql_list(paths: list[str]) -> str:
    return "[" + ", ".join("'" + p.replace("'", "''") + "'" for p in paths) + "]"


def _fingerprint(files: list[str], rules: dict, targets: list) -> str:
    h = hashlib.sha256(json.dumps([rules, [str(t) for t in targets]], sort_keys=True).encode())
    for f in files:
        st = Path(f).stat()
        h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def select_stages(scores: str | Path, output: str | Path, stage1="1.0", stage2="0.1", stage3="0.1", *,
                  rules: dict | None = None, shards_dir: str | None = None, threads: int | None = None) -> dict:  # fmt: skip
    import duckdb

    scores, output = Path(scores), Path(output)
    rules = rules or copy.deepcopy(DEFAULT_RULES)
    targets = [parse_target(t) for t in (stage1, stage2, stage3)]
    files = [str(p) for p in visible_parquet_files(scores)]
    if not files:
        raise FileNotFoundError(f"no score Parquet files in {scores}")
    dup_file = scores / "_dedup" / "duplicates.parquet"
    fp = _fingerprint(files + ([str(dup_file)] if dup_file.exists() else []), rules, targets)
    state_path = output / "_stages.json"
    if state_path.exists() and json.loads(state_path.read_text()).get("fingerprint") == fp and all(
        (output / f"stage{i}.parquet").exists() for i in (1, 2, 3)
    ):
        funnel = json.loads((output / "funnel.json").read_text())
        print(f"stages: {output} is up to date with {scores}; nothing written")
        return funnel
    output.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    tmp, dbfile = output / ".duckdb_tmp", output / ".stages.duckdb"
    dbfile.unlink(missing_ok=True)
    con = duckdb.connect(str(dbfile))  # file-backed: tables larger than memory_limit live on disk
    con.execute(f"SET memory_limit='{rules['memory_limit']}'")
    con.execute(f"SET temp_directory='{tmp}'")
    con.execute("SET preserve_insertion_order=false")
    if threads:
        con.execute(f"SET threads={int(threads)}")
    con.execute(f"CREATE VIEW scores AS SELECT * FROM read_parquet({_sql_list(files)}, union_by_name=true)")
    if dup_file.exists():
        con.execute(f"CREATE VIEW dups AS SELECT key, kind FROM read_parquet({_sql_list([str(dup_file)])})")
    else:
        con.execute("CREATE VIEW dups AS SELECT NULL::VARCHAR AS key, NULL::VARCHAR AS kind WHERE false")
    cols = set(con.execute("SELECT * FROM scores LIMIT 0").fetchdf().columns)
    clip_cols = [c for c in rules["composite"]["clip_columns"] if c in cols]
    clip_expr = f"({' + '.join(f'coalesce({c}, 0)' for c in clip_cols)}) / {len(clip_cols)}" if clip_cols else "0.0"
    aes_expr = "coalesce(aesthetic, 0.0)" if "aesthetic" in cols else "0.0"
    r1 = rules["stage1"]
    statuses = ", ".join(f"'{s}'" for s in r1["caption_status"])
    conditions = [
        ("undecodable", "decode_error IS NULL"),
        ("caption_not_ok", f"caption_status IN ({statuses})"),
        ("below_min_side", f"min_side >= {int(r1['min_side'])}"),
        ("extreme_aspect", f"aspect_ratio <= {float(r1['max_aspect'])}"),
    ]
    cumulative = [" AND ".join(c for _, c in conditions[: i + 1]) for i in range(len(conditions))]
    counts = con.execute(
        "SELECT count(*), " + ", ".join(f"count(*) FILTER (WHERE {c})" for c in cumulative) + " FROM scores"
    ).fetchone()
    total, remaining = counts[0], list(counts[1:])
    con.execute(f"""CREATE TABLE pool AS SELECT key, shard, sha256, caption_levels_ok, width, height, min_side,
                    aspect_ratio, aesthetic, {clip_expr} AS clip_score, {aes_expr} AS aes
                    FROM scores WHERE {cumulative[-1]}""")  # fmt: skip
    if r1.get("drop_duplicates", True):
        # exact: among rows that pass the filters above, keep one per sha256 (largest short side, then key)
        con.execute("""DELETE FROM pool WHERE key IN (SELECT key FROM (SELECT key, row_number() OVER
                       (PARTITION BY sha256 ORDER BY min_side DESC, key) AS rn FROM pool) WHERE rn > 1)""")  # fmt: skip
        conditions.append(("exact_duplicate", ""))
        remaining.append(con.execute("SELECT count(*) FROM pool").fetchone()[0])
        # near: the score job's clusters (unicap.dedup)
        con.execute("DELETE FROM pool WHERE key IN (SELECT key FROM dups WHERE kind = 'near')")
        conditions.append(("near_duplicate", ""))
        remaining.append(con.execute("SELECT count(*) FROM pool").fetchone()[0])
    funnel = {"total": total, "stage1_rules": {}, "targets": [str(t) for t in (stage1, stage2, stage3)]}
    prev = total
    for (name, _), n in zip(conditions, remaining, strict=True):
        funnel["stage1_rules"][name] = {"removed": prev - n, "remaining": n}
        prev = n
    pool = prev
    mc, sc, ma, sa = con.execute(
        "SELECT avg(clip_score), coalesce(stddev_pop(clip_score), 0), avg(aes), coalesce(stddev_pop(aes), 0) FROM pool"
    ).fetchone()
    w = rules["composite"]
    z = lambda col, m, s: f"(({col} - {m or 0}) / {s})" if s and s > 0 else "0.0"  # noqa: E731
    con.execute("ALTER TABLE pool ADD COLUMN composite DOUBLE")
    con.execute(f"UPDATE pool SET composite = {w['clip']} * {z('clip_score', mc, sc)} + {w['aesthetic']} * {z('aes', ma, sa)}")
    location = (f"'{Path(shards_dir).resolve()}/' || shard || '.tar'" if shards_dir else "shard") + " AS location"
    select = ", ".join(location if c == "location" else c for c in MANIFEST_COLUMNS)

    want = [0, 0, 0]
    want[0] = requested(targets[0], pool)
    n1 = min(want[0], pool)
    con.execute(f"CREATE TABLE s1 AS SELECT * FROM pool ORDER BY composite DESC, key LIMIT {n1}")
    eligible2 = con.execute(f"SELECT count(*) FROM s1 WHERE min_side >= {int(rules['stage2']['min_side'])}").fetchone()[0]
    want[1] = requested(targets[1], n1)
    n2 = min(want[1], eligible2)
    con.execute(f"""CREATE TABLE s2 AS SELECT * FROM s1 WHERE min_side >= {int(rules['stage2']['min_side'])}
                    ORDER BY composite DESC, key LIMIT {n2}""")  # fmt: skip
    base3 = "s2" if rules.get("nested", True) else f"(SELECT * FROM s1 WHERE min_side >= {int(rules['stage2']['min_side'])})"
    want[2] = requested(targets[2], n2)
    n3 = min(want[2], n2 if rules.get("nested", True) else eligible2)
    min3 = rules["stage3"].get("min_side")
    where3 = f"WHERE min_side >= {int(min3)}" if min3 else ""
    con.execute(f"CREATE TABLE s3 AS SELECT * FROM {base3} {where3} ORDER BY composite DESC, key LIMIT {n3}")
    for i, table in ((1, "s1"), (2, "s2"), (3, "s3")):
        with atomic_path(output / f"stage{i}.parquet") as tmpfile:
            con.execute(f"COPY (SELECT {select} FROM {table} ORDER BY composite DESC, key) TO '{tmpfile}' (FORMAT PARQUET)")
    sizes = [con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("s1", "s2", "s3")]
    funnel.update(
        stage1={"pool": pool, "target": want[0], "selected": sizes[0], "shortfall": max(0, want[0] - sizes[0])},
        stage2={"eligible_min_side": eligible2, "removed_below_min_side": sizes[0] - eligible2,
                "target": want[1], "selected": sizes[1], "shortfall": max(0, want[1] - sizes[1])},
        stage3={"target": want[2], "selected": sizes[2], "shortfall": max(0, want[2] - sizes[2])},
        composite={"clip_columns": clip_cols, "clip_mean": mc, "clip_std": sc, "aesthetic_mean": ma, "aesthetic_std": sa},
        seconds=round(time.time() - t0, 2),
    )  # fmt: skip
    con.close()
    dbfile.unlink(missing_ok=True)
    write_json(funnel, output / "funnel.json")
    write_json({"fingerprint": fp, "scores": str(scores), "rules": rules}, state_path)
    return funnel


def print_funnel(f: dict) -> None:
    print(f"stages: {f['total']} scored rows")
    for name, r in f["stage1_rules"].items():
        print(f"  - {name:16s} removed {r['removed']:>10}  remaining {r['remaining']:>10}")
    print(f"  stage1: {f['stage1']['selected']} (target {f['stage1']['target']})")
    print(f"  stage2: {f['stage2']['selected']} (target {f['stage2']['target']}, "
          f"{f['stage2']['removed_below_min_side']} below min side, shortfall {f['stage2']['shortfall']})")  # fmt: skip
    print(f"  stage3: {f['stage3']['selected']} (target {f['stage3']['target']}, shortfall {f['stage3']['shortfall']})")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scores", required=True, help="score folder (unicap score output)")
    p.add_argument("--output", required=True, help="folder for stage1/2/3.parquet and funnel.json")
    p.add_argument("--stage1", default="1.0", help="count (100M, 5000) or fraction of the filtered pool")
    p.add_argument("--stage2", default="0.1", help="count or fraction of stage1")
    p.add_argument("--stage3", default="0.1", help="count or fraction of stage2")
    p.add_argument("--rules", default=None, help="JSON/YAML file overriding DEFAULT_RULES")
    p.add_argument("--shards", default=None, help="image shard folder, for the manifests' location column")
    p.add_argument("--threads", type=int, default=None)


def run(args: argparse.Namespace) -> int:
    f = select_stages(args.scores, args.output, args.stage1, args.stage2, args.stage3, rules=load_rules(args.rules),
                      shards_dir=args.shards, threads=args.threads)  # fmt: skip
    print_funnel(f)
    print(f"  manifests: {args.output}/stage{{1,2,3}}.parquet  funnel: {args.output}/funnel.json")
    return 0


if __name__ == "__main__":
    from unicap.cli import module_main

    sys.exit(module_main("pipelines.stages"))
