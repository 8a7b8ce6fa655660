"""Read a run folder into plain dicts, one per report section; nothing here writes or draws.

Every section is a dict with `missing` (a list of (what is missing, how to produce it)) and `notes`
beside its data, so a folder that lacks a part yields a section that says so, never an exception.
Large tables are sampled (the first rows of every file, up to a bound), and the page says so.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from unicap import config, eval_captions
from unicap.atomic import visible_parquet_files
from unicap.contract import caption as caption_record
from unicap.contract import manifest
from unicap.contract import shards as shard_contract
from unicap.report.images import image_inline, image_uri, read_tar_members, thumbnails
from unicap.stage_rules import StageRules

CAPTION_SAMPLE = 50_000  # caption rows read for lengths and failure examples
SCORE_SAMPLE = 200_000  # score / manifest rows read for the distributions
GALLERY_SIZE = 8
HELDOUT_GALLERY_SIZE = 4
EXAMPLES_PER_REASON = 3
THUMB_SIDE = 256  # px, the long side of a gallery thumbnail
SMALL_THUMB_SIDE = 96
MAX_INLINE_SIDE = 1536  # sample grids and adherence images are shrunk to this before they are inlined
CHARACTER_LANGUAGES = ("zh", "ja", "ko", "th")  # caption length counted in characters, others in words


# ---------------------------------------------------------------- the run folder


@dataclass(frozen=True)
class RunFolder:
    """The conventional layout of a run folder (what `make demo` writes); a real run may lack parts."""

    root: Path

    @property
    def data(self) -> Path:
        """The pool's image shards: DIR/data, or DIR/shards (the trainer accepts both)."""
        if not (self.root / "data").is_dir() and (self.root / "shards").is_dir():
            return self.root / "shards"
        return self.root / "data"

    @property
    def truth(self) -> Path:  # the synthetic pool's answer key, as caption records
        return self.data / "truth"

    @property
    def heldout(self) -> Path:
        return self.root / "heldout"

    @property
    def heldout_truth(self) -> Path:
        return self.heldout / "truth"

    @property
    def captions(self) -> Path:
        return self.root / "captions"

    @property
    def heldout_captions(self) -> Path:
        return self.root / "heldout_captions"

    @property
    def scores(self) -> Path:
        return self.root / "scores"

    @property
    def stages(self) -> Path:
        return self.root / "stages"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def adherence(self) -> Path:
        return self.root / "adherence"


def how_to(run: RunFolder) -> dict[str, str]:
    """The command that produces each part of a run folder."""
    d = run.root
    return {
        "data": f"`unicap ingest URLS --out {d}/data` (or `unicap ingest-folder IMAGES --out {d}/data`, "
        f"`unicap synth --out {d}/data --n 1000`)",
        "captions": f"`unicap caption --input {d}/data --output {d}/captions --model Qwen/Qwen2.5-VL-7B-Instruct`",
        "heldout": f"`unicap synth --out {d}/heldout --n 256 --seed 1` and `unicap caption --input {d}/heldout "
        f"--output {d}/heldout_captions --model M`: this report scores them against the answer key "
        f"(`unicap eval-captions --captions {d}/heldout_captions --truth {d}/heldout` writes the same table to _eval.json)",
        "scores": f"`unicap score --input {d}/data --captions {d}/captions --output {d}/scores --clip MODEL`",
        "stages": f"`unicap stages --scores {d}/scores --output {d}/stages --shards {d}/data "
        "--stage1 100M --stage2 10M --stage3 1M`",
        "runs": f"`make stage1 stage2 stage3 DATA={d}` (writes {d}/runs/stageN/)",
        "adherence": f"`unicap adherence --truth {d}/heldout --out {d}/adherence --weights stage1={d}/runs/stage1/final "
        f"--weights stage3={d}/runs/stage3/final` (adherence.json and its images)",
    }


def _section(**data) -> dict:
    return {"missing": [], "notes": [], **data}


def _read_json(path: Path) -> dict | None:
    """A JSON file's object, None when the file is absent; a broken file is a ValueError naming it."""
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def read_sample(files: Iterable[Path], columns: Iterable[str], limit: int) -> tuple[pd.DataFrame, int]:
    """Up to `limit` rows of `columns` (those a file has), the first rows of every file in turn so that
    a sample of many files covers all of them, and the total number of rows of the files."""
    files, columns = list(files), list(columns)
    if not files:
        return pd.DataFrame(columns=columns), 0
    quota = max(1, -(-limit // len(files)))
    frames, total, taken = [], 0, 0
    for f in files:
        pf = pq.ParquetFile(f)
        total += pf.metadata.num_rows
        if taken >= limit or pf.metadata.num_rows == 0:
            continue
        cols = [c for c in columns if c in pf.schema_arrow.names]
        batch = next(pf.iter_batches(batch_size=min(quota, limit - taken), columns=cols), None)
        if batch is not None and batch.num_rows:
            frames.append(batch.to_pandas())
            taken += batch.num_rows
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
    return df, total


def rows_for_keys(directory: Path, keys_by_shard: Mapping[str, Iterable[str]]) -> dict[str, dict]:
    """key -> row of the per-shard Parquet files `directory/{shard}.parquet` (captions, truth)."""
    out: dict[str, dict] = {}
    for shard, keys in keys_by_shard.items():
        path = directory / f"{shard}.parquet"
        if shard_contract.shard_name_ok(shard) and path.is_file():
            table = pq.read_table(path, filters=[("key", "in", sorted(set(keys)))])
            out.update({r["key"]: r for r in table.to_pylist()})
    return out


def caption_levels_languages(files: list[Path]) -> tuple[list[str], list[str]]:
    """The levels and languages caption files declare (metadata), else read from their column names."""
    levels: list[str] = []
    languages: list[str] = []
    for f in files[:50]:
        schema = pq.read_schema(f)
        try:
            lv, lang = caption_record.levels_languages(schema)
        except caption_record.SchemaError:
            pairs = [caption_record.parse_caption_column(c) for c in schema.names if c.count("_") >= 2
                     and c.startswith("caption_")]  # fmt: skip
            lv, lang = [p[0] for p in pairs], [p[1] for p in pairs]
        levels += [x for x in lv if x not in levels]
        languages += [x for x in lang if x not in languages]
    return levels, languages


def _by_shard(pairs: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for key, shard in pairs:
        if isinstance(shard, str):
            out.setdefault(shard, []).append(key)
    return out


# ---------------------------------------------------------------- ingest, captions


def collect_ingest(run: RunFolder) -> dict:
    """The shard indexes: rows, images in the tars, failures by message."""
    sec = _section(rows=None, successes=None, status={}, errors=[], shards=0)
    stats = sorted(run.data.glob(f"*{shard_contract.STATS_SUFFIX}")) if run.data.is_dir() else []
    if not stats:
        sec["missing"].append((f"image shards in {run.data}", how_to(run)["data"]))
        return sec
    status: Counter = Counter()
    rows = successes = 0
    for path in stats:
        s = _read_json(path) or {}
        rows += int(s.get("count") or 0)
        successes += int(s.get("successes") or 0)
        status.update({str(k): int(v) for k, v in (s.get("status") or {}).items()})
    sec.update(rows=rows, successes=successes, status=dict(status), shards=len(stats))
    if rows > successes:
        df, _ = read_sample(visible_parquet_files(run.data), ["status", "error_message"], SCORE_SAMPLE)
        failed = df[df["status"] != shard_contract.SUCCESS] if "status" in df else df
        if "error_message" in failed:
            messages = failed["error_message"].fillna("(no message)").astype(str).str.slice(0, 160)
            sec["errors"] = [(m, int(n)) for m, n in messages.value_counts().head(8).items()]
    return sec


def _length(text: str, language: str) -> int:
    if language in CHARACTER_LANGUAGES:
        return len(re.sub(r"\s+", "", text))
    return len(text.split())


def length_unit(language: str) -> str:
    return "characters" if language in CHARACTER_LANGUAGES else "words"


def caption_lengths(df: pd.DataFrame, levels: list[str], languages: list[str]) -> dict[str, list[int]]:
    """caption column -> lengths of its non-empty captions (words, or characters for CJK languages)."""
    out = {}
    for lv in levels:
        for lang in languages:
            col = caption_record.caption_column(lv, lang)
            texts = df[col].dropna() if col in df else []
            out[col] = [_length(t, lang) for t in texts if isinstance(t, str) and t.strip()]
    return out


def failures_of(error: str | None) -> list[tuple[str, str | None, str]]:
    """The caption record's `error` -> [(reason, column or None, detail)]: "reason: column: detail; ..."
    per failed caption, or one "reason: detail" for the whole row (an undecodable image)."""
    out = []
    for part in (error or "").split("; "):
        if not part.strip():
            continue
        bits = [b.strip() for b in part.split(":", 2)]
        if len(bits) >= 2 and bits[1].startswith("caption_"):
            out.append((bits[0], bits[1], bits[2] if len(bits) > 2 else ""))
        else:
            out.append((bits[0], None, part.split(":", 1)[1].strip() if ":" in part else ""))
    return out


def collect_captions(run: RunFolder) -> dict:
    """The caption job's output: statuses, failures by reason (with examples), caption lengths; and the
    answer key's caption lengths beside them on the synthetic set."""
    sec = _section(summary=None, rows=0, sampled=0, status={}, levels=[], languages=[], lengths={},
                   truth_lengths={}, reasons=[])  # fmt: skip
    files = visible_parquet_files(run.captions) if run.captions.is_dir() else []
    truth_files = visible_parquet_files(run.truth) if run.truth.is_dir() else []
    if not files:
        sec["missing"].append((f"caption Parquet in {run.captions}", how_to(run)["captions"]))
    levels, languages = caption_levels_languages(files or truth_files)
    sec.update(levels=levels, languages=languages)
    cols = caption_record.caption_columns(levels, languages)
    if truth_files:
        tdf, _ = read_sample(truth_files, cols, CAPTION_SAMPLE)
        sec["truth_lengths"] = caption_lengths(tdf, levels, languages)
    if not files:
        return sec
    sec["summary"] = _read_json(run.captions / "_summary.json")
    df, total = read_sample(files, ["key", "shard", "status", "error", *cols], CAPTION_SAMPLE)
    sec.update(rows=total, sampled=len(df))
    summary = sec["summary"] or {}
    sec["status"] = summary.get("status") or {str(k): int(v) for k, v in df["status"].value_counts().items()}
    sec["lengths"] = caption_lengths(df, levels, languages)
    # failures, counted on the sample (the summary has the job's totals by reason)
    per_reason: dict[str, dict] = {}
    for row in df[df["error"].notna()].itertuples(index=False):
        for reason, column, detail in failures_of(row.error):
            r = per_reason.setdefault(reason, {"rows": set(), "captions": 0, "columns": Counter(), "examples": []})
            r["rows"].add(row.key)
            r["captions"] += column is not None
            r["columns"][column or "(whole image)"] += 1
            if len(r["examples"]) < EXAMPLES_PER_REASON and row.key not in {e["key"] for e in r["examples"]}:
                text = getattr(row, column, None) if column in df.columns else None
                r["examples"].append({"key": row.key, "shard": row.shard, "status": row.status, "column": column,
                                      "detail": detail, "text": text if isinstance(text, str) else None})  # fmt: skip
    totals = summary.get("failures_by_reason") or {}
    sec["reasons"] = sorted(
        ({"reason": k, "rows": len(v["rows"]), "captions": v["captions"], "job_total": totals.get(k),
          "columns": v["columns"].most_common(), "examples": v["examples"]} for k, v in per_reason.items()),
        key=lambda r: -r["rows"],
    )  # fmt: skip
    wanted = _by_shard((e["key"], e["shard"]) for r in sec["reasons"] for e in r["examples"])
    thumbs = thumbnails(run.data, wanted, SMALL_THUMB_SIDE)
    for r in sec["reasons"]:
        for e in r["examples"]:
            e["thumb"] = thumbs.get(e["key"])
    if summary.get("failed_shards"):
        sec["notes"].append(
            f"shards that failed as a whole (not written; a re-run retries them): {summary['failed_shards']}"
        )
    if summary.get("refused_samples"):
        sec["notes"].append(f"tar samples that belong to no index row, refused: {summary['refused_samples']}")
    if total > len(df):
        sec["notes"].append(f"lengths and failure examples from a sample of {len(df):,} of {total:,} rows "
                            "(the first rows of every file); statuses and reason totals are the job's")  # fmt: skip
    return sec


# ---------------------------------------------------------------- caption accuracy


def truth_paths(path: str | Path) -> tuple[Path, Path]:
    """A synthetic set (`unicap synth --out DIR`'s DIR) or its truth/ -> (truth Parquet folder, shard folder)."""
    path = Path(path)
    if (path / "truth").is_dir():
        return path / "truth", path
    return path, path.parent


def load_scenes(truth: str | Path) -> dict[str, eval_captions.Scene]:
    """key -> scene graph of every truth row, read from the shards' {key}.json (datagen.synth writes each
    image's scene graph there; `unicap eval-captions` regenerates the same graph from the row's source)."""
    truth_dir, shard_dir = truth_paths(truth)
    files = visible_parquet_files(truth_dir) if truth_dir.is_dir() else []
    if not files:
        raise ValueError(f"{truth}: no truth Parquet files (give `unicap synth --out DIR`'s DIR or DIR/truth)")
    keys = _by_shard(
        (r["key"], r["shard"]) for f in files for r in pq.read_table(f, columns=["key", "shard"]).to_pylist()
    )
    scenes: dict[str, eval_captions.Scene] = {}
    for shard, shard_keys in keys.items():
        tar = shard_contract.tar_path(shard_dir, shard)
        for key, (_, data) in read_tar_members(tar, set(shard_keys), ("json",)).items():
            meta = json.loads(data)
            if isinstance(meta, dict) and "objects" in meta and "background" in meta:
                scenes[key] = eval_captions.Scene.from_dict(meta)
    n = sum(len(k) for k in keys.values())
    if len(scenes) < n:
        raise ValueError(f"{shard_dir}: {n - len(scenes)} of {n} truth rows have no scene graph in their shard's "
                         "{key}.json: give the synthetic set's folder (its shards beside truth/)")  # fmt: skip
    return scenes


def _evaluate(files: list[Path], scenes: Mapping[str, eval_captions.Scene], keys: set[str] | None = None) -> dict:
    """unicap.eval_captions.evaluate + goal_check of caption files (only the rows of `keys` when given), as
    `unicap eval-captions` reports them."""
    levels, languages = caption_levels_languages(files)
    rows = [r for f in files for r in pq.read_table(f).to_pylist() if keys is None or r["key"] in keys]
    metrics = eval_captions.evaluate(rows, scenes, levels, languages)
    metrics["goal"] = eval_captions.goal_check(metrics)
    metrics["models"] = sorted({str(r.get("model")) for r in rows})
    return metrics


def _stage_tables(run: RunFolder, files: list[Path], scenes: Mapping[str, eval_captions.Scene], source: str) -> list:
    """stage3's rows of the pool's captions scored alone: do the CLIP filters keep captions that are right?"""
    path = manifest.manifest_path(run.stages, "stage3")
    if not path.is_file():
        return []
    keys = set(pq.read_table(path, columns=["key"]).column("key").to_pylist())
    return [{"title": "stage3's captions (the same captions, the rows the filters kept)",
             "source": f"{source}, rows of {path}", "metrics": _evaluate(files, scenes, keys)}]  # fmt: skip


def evaluate_against_answer_key(captions: str | Path, truth: str | Path) -> dict:
    """The metrics `unicap eval-captions --captions CAPTIONS --truth TRUTH` writes."""
    files = visible_parquet_files(captions)
    if not files:
        raise ValueError(f"{captions}: no caption Parquet files")
    metrics = _evaluate(files, load_scenes(truth))
    metrics["captions"], metrics["truth"] = str(captions), str(truth_paths(truth)[0])
    return metrics


def collect_accuracy(run: RunFolder, truths: list[str | Path]) -> dict:
    """Caption accuracy against the synthetic answer key, for the held-out captions and the pool's.

    With --truth (one or more answer keys), every caption folder of the run whose keys are in one is scored
    here; otherwise a folder's `_eval.json` (what `unicap eval-captions` wrote) is shown, and the held-out
    set is scored here when it has captions and truth but no _eval.json."""
    sec = _section(tables=[])
    answer_keys = {str(t): load_scenes(t) for t in truths}
    folders = (
        ("held-out synthetic set", run.heldout_captions, run.heldout),
        ("this run's captions", run.captions, run.data),
    )
    for title, captions, own_truth in folders:
        files = visible_parquet_files(captions) if captions.is_dir() else []
        evaluated = captions / "_eval.json"
        if files and answer_keys:
            keys = {k for f in files for k in pq.read_table(f, columns=["key"]).column("key").to_pylist()}
            matching = [t for t, scenes in answer_keys.items() if keys & scenes.keys()]
            if matching:
                scenes = {k: v for t in matching for k, v in answer_keys[t].items()}
                sec["tables"].append({"title": title, "source": f"{captions} against --truth {', '.join(matching)}",
                                      "metrics": _evaluate(files, scenes)})  # fmt: skip
                if captions == run.captions:  # the filters' effect: the last stage's captions against the pool's
                    sec["tables"] += _stage_tables(
                        run, files, scenes, f"{captions} against --truth {', '.join(matching)}"
                    )
                continue
            sec["notes"].append(f"{captions}: none of its keys is in the answer key given with --truth"
                                + (f" (`--truth {own_truth}` scores it)" if (own_truth / "truth").is_dir() else ""))  # fmt: skip
        if evaluated.is_file():
            sec["tables"].append({"title": title, "source": str(evaluated), "metrics": _read_json(evaluated)})
        elif files and captions == run.heldout_captions and run.heldout_truth.is_dir():
            sec["tables"].append({"title": title, "source": f"{captions} against {run.heldout} (computed here: no "
                                  "_eval.json)", "metrics": evaluate_against_answer_key(captions, run.heldout)})  # fmt: skip
        elif files and captions == run.captions and run.truth.is_dir() and not answer_keys:
            sec["notes"].append(f"this pool is synthetic ({run.truth} exists): add `--truth {run.data}` to score "
                                "its captions against the answer key too")  # fmt: skip
    if not any(t["title"] == folders[0][0] for t in sec["tables"]):
        sec["missing"].append((f"held-out captions scored against the answer key ({run.heldout_captions / '_eval.json'})",
                               how_to(run)["heldout"]))  # fmt: skip
    return sec


# ---------------------------------------------------------------- scores, stages, funnel


RULE_WHY = {
    "undecodable": "the image is missing (download failed) or does not decode",
    "caption_not_ok": "caption status not one of: {caption_status}",
    "below_min_side": "short side below {min_side} px",
    "extreme_aspect": "long side / short side above {max_aspect}",
    "duplicate_key": "the same key in several score files (the first shard's row kept)",
    "exact_duplicate": "the same bytes (sha256) as an image kept",
    "near_duplicate": "a near duplicate by CLIP embedding (the score job's clusters)",
}


def collect_funnel(run: RunFolder, ingest: dict) -> dict:
    """Ingest -> scored rows -> each stage1 rule -> stage1 -> stage2 -> stage3, with the reason of every drop."""
    sec = _section(steps=[], funnel=None, caption_status_scores={}, caption_status_sampled=None)
    funnel = _read_json(run.stages / manifest.FUNNEL_FILE)
    rules = (_read_json(run.stages / "_stages.json") or {}).get("rules") or config.to_dict(StageRules())
    steps = sec["steps"]
    if ingest.get("rows") is not None:
        steps.append({"name": "input rows", "remaining": ingest["rows"], "removed": 0,
                      "why": f"rows of the shard indexes ({ingest['shards']} shards)"})  # fmt: skip
        failed = {k: v for k, v in ingest["status"].items() if k != shard_contract.SUCCESS}
        steps.append({"name": "images in the shards", "remaining": ingest["successes"],
                      "removed": ingest["rows"] - ingest["successes"],
                      "why": ", ".join(f"{k}: {v:,}" for k, v in failed.items()) or "every row has its image"})  # fmt: skip
    if funnel is None:
        sec["missing"].append((f"{run.stages / manifest.FUNNEL_FILE}", how_to(run)["stages"]))
        return sec
    sec["funnel"] = funnel
    score_files = visible_parquet_files(run.scores) if run.scores.is_dir() else []
    if score_files:
        df, total = read_sample(score_files, ["caption_status"], SCORE_SAMPLE)
        sec["caption_status_scores"] = {str(k): int(v) for k, v in df["caption_status"].value_counts().items()}
        sec["caption_status_sampled"] = (len(df), total) if total > len(df) else None
    s1 = rules.get("stage1", {})
    params = {"caption_status": ", ".join(map(str, s1.get("caption_status") or [])), "min_side": s1.get("min_side"),
              "max_aspect": s1.get("max_aspect")}  # fmt: skip
    steps.append({"name": "scored rows", "remaining": funnel["total"], "removed": None,
                  "why": "rows of the score files (one per input row)"})  # fmt: skip
    # funnel.json's keys are sorted by name: the order the rules ran in is that of the rows remaining
    order = list(RULE_WHY)
    applied = sorted(funnel.get("stage1_rules", {}).items(), key=lambda kv: (
        -kv[1]["remaining"], order.index(kv[0]) if kv[0] in order else len(order)))  # fmt: skip
    for name, r in applied:
        why = RULE_WHY.get(name, name).format(**params)
        if name == "caption_not_ok" and sec["caption_status_scores"]:
            bad = {k: v for k, v in sec["caption_status_scores"].items() if k not in (s1.get("caption_status") or [])}
            sampled = sec["caption_status_sampled"]
            of = f" in a sample of {sampled[0]:,} rows" if sampled else ""
            why += (" (" + ", ".join(f"{k}: {v:,}" for k, v in bad.items()) + of + ")") if bad else ""
        steps.append({"name": name.replace("_", " "), "remaining": r["remaining"], "removed": r["removed"], "why": why})
    targets = funnel.get("targets") or ["?", "?", "?"]
    st1, st2, st3 = (funnel.get(s, {}) for s in manifest.STAGES)
    if st1:
        steps.append({"name": "stage1", "remaining": st1["selected"], "removed": st1["pool"] - st1["selected"],
                      "why": f"target {targets[0]} -> {st1['target']:,}: the best by composite score kept"
                      + (f"; shortfall {st1['shortfall']:,}" if st1.get("shortfall") else "")})  # fmt: skip
    if st2:
        below = st2.get("removed_below_min_side", 0)
        cut = st2["eligible_min_side"] - st2["selected"]
        steps.append({"name": "stage2", "remaining": st2["selected"], "removed": st1.get("selected", 0) - st2["selected"],
                      "why": f"{below:,} with short side below {rules.get('stage2', {}).get('min_side')} px; "
                      f"{cut:,} below the cut (target {targets[1]} -> {st2['target']:,})"
                      + (f"; shortfall {st2['shortfall']:,}" if st2.get("shortfall") else "")})  # fmt: skip
    if st3:
        steps.append({"name": "stage3", "remaining": st3["selected"], "removed": st2.get("selected", 0) - st3["selected"],
                      "why": f"the best of stage2 (target {targets[2]} -> {st3['target']:,})"
                      + (f"; shortfall {st3['shortfall']:,}" if st3.get("shortfall") else "")})  # fmt: skip
    if funnel.get("non_finite_scores"):
        sec["notes"].append(f"non-finite scores (NaN/inf) read as missing: {funnel['non_finite_scores']}")
    if funnel.get("pool_rows_without_sha256"):
        sec["notes"].append(
            f"{funnel['pool_rows_without_sha256']:,} pool rows without sha256: kept, not exact-deduplicated"
        )
    return sec


def _clip_score(df: pd.DataFrame, columns: list[str]) -> pd.Series:
    """The stages' clip score: the mean of the rules' clip columns, a missing one counting 0."""
    cols = [c for c in columns if c in df]
    return df[cols].fillna(0.0).mean(axis=1) if cols else pd.Series(dtype=float)


def collect_scores(run: RunFolder, funnel: dict | None) -> dict:
    """CLIP and aesthetic distributions of the scored pool and of each stage's manifest."""
    sec = _section(series={}, counts={}, clip_columns=[], clip_model=None, summary=None)
    score_files = visible_parquet_files(run.scores) if run.scores.is_dir() else []
    clip_cols = list(((funnel or {}).get("composite") or {}).get("clip_columns") or StageRules().composite.clip_columns)
    sec["clip_columns"] = clip_cols
    if score_files:
        sec["summary"] = _read_json(run.scores / "_summary.json")
        df, total = read_sample(score_files, ["decode_error", "aesthetic", "clip_model", *clip_cols], SCORE_SAMPLE)
        decoded = df[df["decode_error"].isna()] if "decode_error" in df else df
        sec["series"]["scored pool"] = {"clip": _finite(_clip_score(decoded, clip_cols)),
                                        "aesthetic": _finite(decoded.get("aesthetic", pd.Series(dtype=float)))}  # fmt: skip
        sec["counts"]["scored pool"] = total
        models = df["clip_model"].dropna().unique().tolist() if "clip_model" in df else []
        sec["clip_model"] = ", ".join(map(str, models[:3])) or None
        if total > len(df):
            sec["notes"].append(f"the pool's distributions from a sample of {len(df):,} of {total:,} rows")
    else:
        sec["missing"].append((f"score Parquet in {run.scores}", how_to(run)["scores"]))
    for stage in manifest.STAGES:
        path = manifest.manifest_path(run.stages, stage)
        if path.is_file():
            df, total = read_sample([path], ["clip_score", "aesthetic"], SCORE_SAMPLE)
            sec["series"][stage] = {"clip": _finite(df["clip_score"]), "aesthetic": _finite(df["aesthetic"])}
            sec["counts"][stage] = total
    if not any(s in sec["series"] for s in manifest.STAGES):
        sec["missing"].append((f"stage manifests in {run.stages}", how_to(run)["stages"]))
    return sec


def _finite(s: pd.Series) -> list[float]:
    return [float(v) for v in pd.to_numeric(s, errors="coerce").dropna() if math.isfinite(v)]


# ---------------------------------------------------------------- the gallery


def collect_gallery(run: RunFolder, *, heldout: bool = False) -> dict:
    """Images with their captions at every level and language (and the answer key's, when there is one):
    the best of the last stage first, on the held-out set its first images."""
    shards = run.heldout if heldout else run.data
    cap_dir = run.heldout_captions if heldout else run.captions
    truth_dir = run.heldout_truth if heldout else run.truth
    size = HELDOUT_GALLERY_SIZE if heldout else GALLERY_SIZE
    sec = _section(items=[], levels=[], languages=[], has_truth=truth_dir.is_dir())
    picked: list[tuple[str, str, str]] = []  # key, shard, where it was picked from
    locations: dict[str, str] = {}
    if not heldout:
        for stage in reversed(manifest.STAGES):
            path = manifest.manifest_path(run.stages, stage)
            if path.is_file() and len(picked) < size:
                m = pq.ParquetFile(path)
                batch = next(m.iter_batches(batch_size=size, columns=["key", "shard", "location"]), None)
                for r in batch.to_pylist() if batch is not None else []:
                    if r["key"] not in {p[0] for p in picked} and len(picked) < size:
                        picked.append((r["key"], r["shard"], stage))
                        if r.get("location"):
                            locations[r["shard"]] = r["location"]
    cap_files = visible_parquet_files(cap_dir) if cap_dir.is_dir() else []
    source = cap_files or (visible_parquet_files(truth_dir) if truth_dir.is_dir() else [])
    if len(picked) < size and source:
        df, _ = read_sample(source, ["key", "shard", "status"], 500)
        order = {"ok": 0, "partial": 1, "failed": 2}
        df = df.assign(_o=df["status"].map(order).fillna(3)).sort_values("_o", kind="stable")
        for r in df.itertuples(index=False):
            if r.key not in {p[0] for p in picked} and len(picked) < size:
                picked.append((r.key, r.shard, "held-out set" if heldout else "captions"))
    if len(picked) < size and shards.is_dir():  # no captions: the first images of the shards
        for f in visible_parquet_files(shards)[:size]:
            index = pq.read_table(f, columns=["key", "status"]).to_pylist()
            for r in index:
                if (
                    r["status"] == shard_contract.SUCCESS
                    and r["key"] not in {p[0] for p in picked}
                    and len(picked) < size
                ):
                    picked.append((r["key"], f.stem, "shards"))
    if not picked:
        sec["missing"].append((f"images in {shards}", how_to(run)["heldout" if heldout else "data"]))
        return sec
    levels, languages = caption_levels_languages(source) if source else ([], [])
    sec.update(levels=levels, languages=languages)
    keys = _by_shard((k, s) for k, s, _ in picked)
    captions = rows_for_keys(cap_dir, keys) if cap_files else {}
    truth = rows_for_keys(truth_dir, keys) if truth_dir.is_dir() else {}
    thumbs = thumbnails(shards, keys, THUMB_SIDE, locations)
    for key, shard, origin in picked:
        row = captions.get(key) or {}
        t = truth.get(key) or {}
        failed = {col: reason for reason, col, _ in failures_of(row.get("error")) if col}
        whole = [f"{reason}: {detail}" for reason, col, detail in failures_of(row.get("error")) if not col]
        sec["items"].append({
            "key": key, "shard": shard, "origin": origin, "thumb": thumbs.get(key),
            "width": row.get("width") or t.get("width"), "height": row.get("height") or t.get("height"),
            "status": row.get("status"), "model": row.get("model"), "whole_error": "; ".join(whole) or None,
            "captions": {c: row.get(c) for c in caption_record.caption_columns(levels, languages)},
            "failed": failed,
            "truth": {c: t.get(c) for c in caption_record.caption_columns(levels, languages)} if t else None,
        })  # fmt: skip
    if not cap_files:
        sec["missing"].append((f"captions in {cap_dir}", how_to(run)["heldout" if heldout else "captions"]))
    return sec


# ---------------------------------------------------------------- training runs


def _step_of(path: Path) -> int:
    m = re.search(r"(\d+)", path.stem)
    return int(m.group(1)) if m else -1


def collect_training(run: RunFolder) -> dict:
    """Per stage: the loss curve (metrics.jsonl), the final state, the latest sample grid and its prompts."""
    sec = _section(stages={})
    for stage in manifest.STAGES:
        d = run.runs / stage
        if not d.is_dir():
            sec["missing"].append((f"{d}", how_to(run)["runs"].replace("stage1 stage2 stage3", stage)))
            continue
        info: dict = {"steps": [], "loss": [], "bad_lines": 0, "state": None, "sample": None, "sample_step": None,
                      "sample_steps": [], "prompts": [], "missing": []}  # fmt: skip
        metrics = d / "metrics.jsonl"
        if metrics.is_file():
            for line in metrics.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    m = json.loads(line)
                    step, loss = int(m["step"]), m.get("loss")
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                    info["bad_lines"] += bool(line.strip())
                    continue
                if isinstance(loss, int | float) and math.isfinite(loss):
                    info["steps"].append(step)
                    info["loss"].append(float(loss))
        else:
            info["missing"].append(f"{metrics} (the trainer writes one line per step)")
        info["state"] = _read_json(d / "final" / "state.json")
        if info["state"] is None:
            info["missing"].append(f"{d / 'final' / 'state.json'} (written when the stage finishes)")
        run_cfg = ((info["state"] or {}).get("config") or {}).get("run")
        if run_cfg is None and (d / "config.yaml").is_file():
            run_cfg = config.read_yaml(d / "config.yaml").get("run")
        info["prompts"] = [str(p) for p in (run_cfg or {}).get("sample_prompts") or []]
        grids = sorted((d / "samples").glob("step-*.png"), key=_step_of) if (d / "samples").is_dir() else []
        info["sample_steps"] = [_step_of(g) for g in grids]
        for grid in reversed(grids):  # the latest step that decodes
            inlined = image_inline(grid.read_bytes(), MAX_INLINE_SIDE, keep_png=True)
            if inlined:
                info["sample"], info["sample_width"], _ = inlined
                info["sample_step"] = _step_of(grid)
                break
        if info["sample"] is None:
            info["missing"].append(f"sample grids in {d / 'samples'} (run.sample_every, and at the end)")
        sec["stages"][stage] = info
    return sec


# ---------------------------------------------------------------- prompt adherence


def collect_adherence(run: RunFolder) -> dict:
    """adherence/adherence.json and every adherence_*/adherence.json beside it (other prompt languages or levels:
    the demo's adherence_zh/), one entry each in "runs": attribute accuracy per weights, the facts behind it,
    examples with their images."""
    sec = _section(runs=[])
    extra = sorted(p for p in run.root.glob("adherence_*") if p.is_dir() and (p / "adherence.json").is_file())
    for folder in [run.adherence, *extra]:
        data = _read_json(folder / "adherence.json")
        if data is None:
            sec["missing"].append((str(folder / "adherence.json"), how_to(run)["adherence"]))
            continue
        sec["runs"].append({"folder": folder.name, "data": data, "examples": _adherence_examples(folder, data)})
    return sec


def _adherence_examples(folder: Path, data: dict) -> list[dict]:
    """The examples of one adherence.json with their images inlined (paths that leave the folder are not read)."""
    root = folder.resolve()

    def inline(rel) -> str | None:
        if not isinstance(rel, str):
            return None
        p = (folder / rel).resolve()
        if not p.is_relative_to(root) or not p.is_file():
            return None
        return image_uri(p.read_bytes(), THUMB_SIDE)

    return [{**ex, "image_uri": inline(ex.get("image")), "truth_uri": inline(ex.get("truth_image"))}
            for ex in data.get("examples") or [] if isinstance(ex, dict)]  # fmt: skip


# ---------------------------------------------------------------- everything


def collect(data: str | Path, truth: Iterable[str | Path] = (), on_error=None) -> dict:
    """Every section of the report of run folder `data`, with the answer keys `truth` (synthetic sets).
    A section whose files cannot be read becomes a section with that error (`on_error(name, exc)` is told
    first), so one bad file costs only its section."""
    run, truth = RunFolder(Path(data)), list(truth)
    if not run.root.is_dir():
        raise NotADirectoryError(f"{run.root}: not a folder (give the run folder, e.g. the demo's `demo`)")

    def guarded(name: str, fn, *args) -> dict:
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 - a report shows what it could read
            if on_error is not None:
                on_error(name, e)
            sec = _section()
            sec["error"] = f"{type(e).__name__}: {e}"
            return sec

    ingest = guarded("ingest", collect_ingest, run)
    funnel = guarded("funnel", collect_funnel, run, ingest)
    out = {
        "root": str(run.root),
        "truth": [str(t) for t in truth],
        "ingest": ingest,
        "funnel": funnel,
        "captions": guarded("captions", collect_captions, run),
        "accuracy": guarded("accuracy", collect_accuracy, run, truth),
        "scores": guarded("scores", collect_scores, run, funnel.get("funnel")),
        "gallery": guarded("gallery", collect_gallery, run),
        "training": guarded("training", collect_training, run),
        "adherence": guarded("adherence", collect_adherence, run),
    }
    ok_scored = funnel.get("caption_status_scores", {}).get("ok")
    ok_captions = (out["captions"].get("status") or {}).get("ok", 0)
    if ok_scored is not None and out["captions"].get("rows") and not funnel.get("caption_status_sampled") \
            and ok_scored != ok_captions:  # fmt: skip
        funnel["notes"].append(
            f"the score files count {ok_scored:,} ok captions, {run.captions} holds {ok_captions:,}: the scores "
            "were computed with another caption folder (`unicap score --captions`) or before the captions changed"
        )
    if run.heldout.is_dir():
        out["heldout_gallery"] = guarded("heldout_gallery", lambda: collect_gallery(run, heldout=True))
    return out
