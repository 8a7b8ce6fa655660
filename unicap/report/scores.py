"""The Scores section: CLIP and aesthetic distributions of the scored pool and of each stage's manifest."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import pandas as pd

from unicap.contract import manifest
from unicap.report import plots
from unicap.report.markup import Section, esc, figure, num, section_head, table
from unicap.report.run_folder import (
    SCORE_SAMPLE,
    RunFolder,
    empty_section,
    how_to,
    parquet_files,
    read_json,
    read_sample,
)
from unicap.stage_rules import StageRules

# ---------------------------------------------------------------- collect


def _clip_score(df: pd.DataFrame, columns: list[str]) -> pd.Series:
    """The stages' clip score: the mean of the rules' clip columns, a missing one counting 0."""
    cols = [c for c in columns if c in df]
    return df[cols].fillna(0.0).mean(axis=1) if cols else pd.Series(dtype=float)


def _finite(s: pd.Series) -> list[float]:
    return [float(v) for v in pd.to_numeric(s, errors="coerce").dropna() if math.isfinite(v)]


def collect_scores(run: RunFolder, funnel: dict | None) -> dict:
    """CLIP and aesthetic distributions of the scored pool and of each stage's manifest."""
    sec = empty_section(series={}, counts={}, clip_columns=[], clip_model=None, summary=None)
    score_files = parquet_files(run.scores)
    composite = (funnel or {}).get("composite") or {}
    clip_cols = list(composite.get("clip_columns") or StageRules().composite.clip_columns)
    sec["clip_columns"] = clip_cols
    if score_files:
        sec["summary"] = read_json(run.scores.join("_summary.json"))
        df, total = read_sample(score_files, ["decode_error", "aesthetic", "clip_model", *clip_cols], SCORE_SAMPLE)
        decoded = df[df["decode_error"].isna()] if "decode_error" in df else df
        clip = _clip_score(decoded, clip_cols)
        aesthetic = decoded.get("aesthetic", pd.Series(dtype=float))
        sec["series"]["scored pool"] = {"clip": _finite(clip), "aesthetic": _finite(aesthetic)}
        sec["counts"]["scored pool"] = total
        models = df["clip_model"].dropna().unique().tolist() if "clip_model" in df else []
        sec["clip_model"] = ", ".join(map(str, models[:3])) or None
        if total > len(df):
            sec["notes"].append(f"the pool's distributions from a sample of {len(df):,} of {total:,} rows")
    else:
        sec["missing"].append((f"score Parquet in {run.scores}", how_to(run)["scores"]))
    for stage in manifest.STAGES:
        path = run.manifest(stage)
        if path.is_file():
            df, total = read_sample([path], ["clip_score", "aesthetic"], SCORE_SAMPLE)
            sec["series"][stage] = {"clip": _finite(df["clip_score"]), "aesthetic": _finite(df["aesthetic"])}
            sec["counts"][stage] = total
    if not any(s in sec["series"] for s in manifest.STAGES):
        sec["missing"].append((f"stage manifests in {run.stages}", how_to(run)["stages"]))
    return sec


# ---------------------------------------------------------------- render

HEAD = ["", "images", "CLIP median", "CLIP 10–90%", "aesthetic median", "aesthetic 10–90%"]


def _median_and_range(values: Sequence[float]) -> list[str]:
    """The median and the 10th to 90th percentile of `values`, as two cells."""
    v = sorted(values)
    if not v:
        return ["–", "–"]
    return [f"{v[len(v) // 2]:.3f}", f"{v[len(v) // 10]:.3f} – {v[(9 * len(v)) // 10]:.3f}"]


def body(r: Mapping) -> str:
    sec = r["scores"]
    out = section_head(sec)
    series = sec.get("series") or {}
    clip_columns = ", ".join(c.removeprefix("clip_") for c in sec.get("clip_columns") or [])
    fig = plots.score_distributions(series, f"CLIP score (mean of {clip_columns})")
    if fig:
        out += figure(fig, "score distributions")
        rows = []
        for name, s in series.items():
            clip, aesthetic = _median_and_range(s.get("clip") or []), _median_and_range(s.get("aesthetic") or [])
            rows.append([esc(name), num(sec["counts"].get(name)), *clip, *aesthetic])
        out += table(HEAD, rows, num_cols=(1, 2, 3, 4, 5))
        if sec.get("clip_model"):
            out += f'<p class="legend">CLIP model <code>{esc(sec["clip_model"])}</code>.</p>'
    return out


LEAD = (
    "How well the captions match their images (CLIP cosine) and how good the images look (aesthetic head), "
    "for the scored pool and each stage: later stages should sit further right."
)
SECTION = Section("scores", "Scores", "CLIP and aesthetic scores per stage", LEAD, body)
