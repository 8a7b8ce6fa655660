"""The Captions section: the caption job's statuses, caption lengths per level and language (beside the
answer key's on the synthetic set), and its failures by reason with examples."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

import pandas as pd

from unicap.contract import caption as caption_record
from unicap.report import plots
from unicap.report.images import thumbnails
from unicap.report.markup import (
    Section,
    badge,
    esc,
    figure,
    num,
    section_head,
    status_badge,
    status_chips,
    table,
    thumb,
)
from unicap.report.run_folder import (
    RunFolder,
    by_shard,
    caption_length,
    caption_levels_languages,
    empty_section,
    how_to,
    parquet_files,
    read_json,
    read_sample,
)

CAPTION_SAMPLE = 50_000  # caption rows read for lengths and failure examples
EXAMPLES_PER_REASON = 3
SMALL_THUMB_SIDE = 96  # px, the long side of a failure example's thumbnail

# ---------------------------------------------------------------- collect


def caption_lengths(df: pd.DataFrame, levels: list[str], languages: list[str]) -> dict[str, list[int]]:
    """caption column -> lengths of its non-empty captions (words, or characters for CJK languages)."""
    out = {}
    for lv in levels:
        for lang in languages:
            col = caption_record.caption_column(lv, lang)
            texts = df[col].dropna() if col in df else []
            out[col] = [caption_length(t, lang) for t in texts if isinstance(t, str) and t.strip()]
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


def _new_reason(reason: str, job_total: int | None) -> dict:
    """A reason's counts while the rows are read: "rows" holds the keys, "columns" a Counter."""
    return dict(reason=reason, rows=set(), captions=0, job_total=job_total, columns=Counter(), examples=[])


def failures_by_reason(df: pd.DataFrame, job_totals: Mapping[str, int]) -> list[dict]:
    """The failures of the rows read, per reason (most rows first): rows, captions, caption columns, up to
    EXAMPLES_PER_REASON examples, and the job's total for the reason (the caption summary's)."""
    per_reason: dict[str, dict] = {}
    for row in df[df["error"].notna()].itertuples(index=False):
        for reason, column, detail in failures_of(row.error):
            if reason not in per_reason:
                per_reason[reason] = _new_reason(reason, job_totals.get(reason))
            r = per_reason[reason]
            r["rows"].add(row.key)
            r["captions"] += column is not None
            r["columns"][column or "(whole image)"] += 1
            if len(r["examples"]) < EXAMPLES_PER_REASON and row.key not in {e["key"] for e in r["examples"]}:
                text = getattr(row, column, None) if column in df.columns else None
                example = {"key": row.key, "shard": row.shard, "status": row.status, "column": column}
                r["examples"].append({**example, "detail": detail, "text": text if isinstance(text, str) else None})
    for r in per_reason.values():  # the keys counted -> their number; the columns most frequent first
        r["rows"], r["columns"] = len(r["rows"]), r["columns"].most_common()
    return sorted(per_reason.values(), key=lambda r: -r["rows"])


def collect_captions(run: RunFolder) -> dict:
    """The caption job's output: statuses, failures by reason (with examples), caption lengths; and the
    answer key's caption lengths beside them on the synthetic set."""
    sec = empty_section(summary=None, rows=0, sampled=0, status={}, levels=[], languages=[], lengths={})
    sec.update(truth_lengths={}, reasons=[])
    files = parquet_files(run.captions)
    truth_files = parquet_files(run.truth)
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
    sec["summary"] = read_json(run.captions.join("_summary.json"))
    df, total = read_sample(files, ["key", "shard", "status", "error", *cols], CAPTION_SAMPLE)
    sec.update(rows=total, sampled=len(df))
    summary = sec["summary"] or {}
    sec["status"] = summary.get("status") or {str(k): int(v) for k, v in df["status"].value_counts().items()}
    sec["lengths"] = caption_lengths(df, levels, languages)
    # failures, counted on the sample (the summary has the job's totals by reason)
    sec["reasons"] = failures_by_reason(df, summary.get("failures_by_reason") or {})
    wanted = by_shard((e["key"], e["shard"]) for r in sec["reasons"] for e in r["examples"])
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
        sec["notes"].append(
            f"lengths and failure examples from a sample of {len(df):,} of {total:,} rows "
            "(the first rows of every file); statuses and reason totals are the job's"
        )
    return sec


# ---------------------------------------------------------------- render

LENGTHS_LEGEND = (
    "<p class=\"legend\">Blue bars: this run's captions; grey: the answer key (the synthetic set's exact "
    "captions), when the pool is synthetic. Words for English, characters for Chinese.</p>"
)
REASONS_HEAD = ["reason", "rows", "captions", "job total", "where (caption column: count)"]
REASONS_LEGEND = (
    '<p class="legend">rows / captions: in the rows read; job total: <code>captions/_summary.json</code>.</p>'
)


def _lengths(sec: Mapping) -> str:
    levels, languages = sec.get("levels") or [], sec.get("languages") or []
    hist = plots.length_histograms(sec.get("lengths") or {}, sec.get("truth_lengths") or {}, levels, languages)
    if not hist:
        return ""
    out = "<h3>Caption lengths per level × language</h3>" + LENGTHS_LEGEND
    if not any((sec.get("lengths") or {}).values()) and sec.get("rows"):
        out += '<div class="note">None of this run\'s captions passed their checks: only the answer key is drawn.</div>'
    return out + figure(hist, "caption length histograms")


def _reason_row(x: Mapping) -> list[str]:
    where = ", ".join(f"{c.removeprefix('caption_')} {n:,}" for c, n in x["columns"][:8])
    return [badge(x["reason"], "failed"), num(x["rows"]), num(x["captions"]), num(x["job_total"]), esc(where)]


def _example(e: Mapping) -> str:
    """One failed row: its thumbnail, key, status, column, the failure's detail and what the model wrote."""
    img = thumb(e.get("thumb"), e["key"], "no image")
    said = f'<div class="cap">the model wrote: {esc(e["text"])}</div>' if e.get("text") else ""
    what = f"<code>{esc(e['key'])}</code> {status_badge(e['status'])} {esc(e['column'] or 'whole image')}"
    return f'<div class="example">{img}<div>{what}<div class="cap">{esc(e["detail"])}</div>{said}</div></div>'


def _reasons(reasons: list[Mapping]) -> str:
    out = "<h3>Failures by reason</h3>"
    out += table(REASONS_HEAD, [_reason_row(x) for x in reasons], num_cols=(1, 2, 3)) + REASONS_LEGEND
    for x in reasons:
        examples = "".join(_example(e) for e in x["examples"])
        summary = f"<summary>{esc(x['reason'])}: examples</summary>"
        out += f"<details>{summary}<div class='examples'>{examples}</div></details>"
    return out


def body(r: Mapping) -> str:
    sec = r["captions"]
    out = section_head(sec)
    status = sec.get("status") or {}
    if status:
        summary = sec.get("summary") or {}
        model = (summary.get("last_run") or {}).get("model")
        out += "<p>Status of every row: " + status_chips(sorted(status.items()))
        out += (f" &nbsp;·&nbsp; model <code>{esc(model)}</code>" if model else "") + "</p>"
    out += _lengths(sec)
    reasons = sec.get("reasons") or []
    if reasons:
        out += _reasons(reasons)
    elif status:
        out += "<p>No caption failed.</p>"
    return out


LEAD = (
    "The captioning job's output: what share of rows came out ok, how long the captions are at each level and "
    "language, and why the others failed."
)
SECTION = Section("captions", "Captions", "Captions", LEAD, body)
