"""The Funnel section: from the ingest's input rows through the score files and every stage1 rule to stage3,
with the reason of every drop; and the ingest's failures by message."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

from unicap import config
from unicap.contract import manifest
from unicap.contract import shards as shard_contract
from unicap.report import plots
from unicap.report.markup import Section, esc, figure, num, section_head, status_chips, table
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

RULE_WHY = {
    "undecodable": "the image is missing (download failed) or does not decode",
    "caption_not_ok": "caption status not one of: {caption_status}",
    "below_min_side": "short side below {min_side} px",
    "extreme_aspect": "long side / short side above {max_aspect}",
    "duplicate_key": "the same key in several score files (the first shard's row kept)",
    "exact_duplicate": "the same bytes (sha256) as an image kept",
    "near_duplicate": "a near duplicate by CLIP embedding (the score job's clusters)",
}


def collect_ingest(run: RunFolder) -> dict:
    """The shard indexes: rows, images in the tars, failures by message."""
    sec = empty_section(rows=None, successes=None, status={}, errors=[], shards=0)
    stats = run.data.files(shard_contract.STATS_SUFFIX)
    if not stats:
        sec["missing"].append((f"image shards in {run.data}", how_to(run)["data"]))
        return sec
    status: Counter = Counter()
    rows = successes = 0
    for path in stats:
        s = read_json(path) or {}
        rows += int(s.get("count") or 0)
        successes += int(s.get("successes") or 0)
        status.update({str(k): int(v) for k, v in (s.get("status") or {}).items()})
    sec.update(rows=rows, successes=successes, status=dict(status), shards=len(stats))
    if rows > successes:
        df, _ = read_sample(parquet_files(run.data), ["status", "error_message"], SCORE_SAMPLE)
        failed = df[df["status"] != shard_contract.SUCCESS] if "status" in df else df
        if "error_message" in failed:
            messages = failed["error_message"].fillna("(no message)").astype(str).str.slice(0, 160)
            sec["errors"] = [(m, int(n)) for m, n in messages.value_counts().head(8).items()]
    return sec


def _step(name: str, remaining: int, removed: int | None, why: str) -> dict:
    return {"name": name, "remaining": remaining, "removed": removed, "why": why}


def _shortfall(stage: Mapping) -> str:
    return f"; shortfall {stage['shortfall']:,}" if stage.get("shortfall") else ""


def _rule_order(item: tuple[str, Mapping]) -> tuple[int, int]:
    """funnel.json's rules are sorted by name: the order they ran in is that of the rows remaining (most
    first), ties in RULE_WHY's order."""
    name, counts = item
    known = list(RULE_WHY)
    return -counts["remaining"], known.index(name) if name in known else len(known)


def _stage_steps(funnel: Mapping, rules: Mapping) -> list[dict]:
    """The steps stage1 -> stage2 -> stage3 of funnel.json: what each kept and why the others went."""
    steps = []
    targets = funnel.get("targets") or ["?", "?", "?"]
    st1, st2, st3 = (funnel.get(s, {}) for s in manifest.STAGES)
    if st1:
        why = f"target {targets[0]} -> {st1['target']:,}: the best by composite score kept" + _shortfall(st1)
        steps.append(_step("stage1", st1["selected"], st1["pool"] - st1["selected"], why))
    if st2:
        below = st2.get("removed_below_min_side", 0)
        cut = st2["eligible_min_side"] - st2["selected"]
        min_side = rules.get("stage2", {}).get("min_side")
        why = (
            f"{below:,} with short side below {min_side} px; "
            f"{cut:,} below the cut (target {targets[1]} -> {st2['target']:,})" + _shortfall(st2)
        )
        steps.append(_step("stage2", st2["selected"], st1.get("selected", 0) - st2["selected"], why))
    if st3:
        why = f"the best of stage2 (target {targets[2]} -> {st3['target']:,})" + _shortfall(st3)
        steps.append(_step("stage3", st3["selected"], st2.get("selected", 0) - st3["selected"], why))
    return steps


def collect_funnel(run: RunFolder, ingest: dict) -> dict:
    """Ingest -> scored rows -> each stage1 rule -> stage1 -> stage2 -> stage3, with the reason of every drop."""
    sec = empty_section(steps=[], funnel=None, caption_status_scores={}, caption_status_sampled=None)
    funnel_file = run.stages.join(manifest.FUNNEL_FILE)
    funnel = read_json(funnel_file)
    rules = (read_json(run.stages.join("_stages.json")) or {}).get("rules") or config.to_dict(StageRules())
    steps = sec["steps"]
    if ingest.get("rows") is not None:
        steps.append(_step("input rows", ingest["rows"], 0, f"rows of the shard indexes ({ingest['shards']} shards)"))
        failed = {k: v for k, v in ingest["status"].items() if k != shard_contract.SUCCESS}
        why = ", ".join(f"{k}: {v:,}" for k, v in failed.items()) or "every row has its image"
        steps.append(_step("images in the shards", ingest["successes"], ingest["rows"] - ingest["successes"], why))
    if funnel is None:
        sec["missing"].append((f"{funnel_file}", how_to(run)["stages"]))
        return sec
    sec["funnel"] = funnel
    score_files = parquet_files(run.scores)
    if score_files:
        df, total = read_sample(score_files, ["caption_status"], SCORE_SAMPLE)
        sec["caption_status_scores"] = {str(k): int(v) for k, v in df["caption_status"].value_counts().items()}
        sec["caption_status_sampled"] = (len(df), total) if total > len(df) else None
    s1 = rules.get("stage1", {})
    accepted = ", ".join(map(str, s1.get("caption_status") or []))
    params = {"caption_status": accepted, "min_side": s1.get("min_side"), "max_aspect": s1.get("max_aspect")}
    steps.append(_step("scored rows", funnel["total"], None, "rows of the score files (one per input row)"))
    for name, r in sorted(funnel.get("stage1_rules", {}).items(), key=_rule_order):
        why = RULE_WHY.get(name, name).format(**params)
        if name == "caption_not_ok" and sec["caption_status_scores"]:
            bad = {k: v for k, v in sec["caption_status_scores"].items() if k not in (s1.get("caption_status") or [])}
            sampled = sec["caption_status_sampled"]
            of = f" in a sample of {sampled[0]:,} rows" if sampled else ""
            why += (" (" + ", ".join(f"{k}: {v:,}" for k, v in bad.items()) + of + ")") if bad else ""
        steps.append(_step(name.replace("_", " "), r["remaining"], r["removed"], why))
    steps += _stage_steps(funnel, rules)
    if funnel.get("non_finite_scores"):
        sec["notes"].append(f"non-finite scores (NaN/inf) read as missing: {funnel['non_finite_scores']}")
    if funnel.get("pool_rows_without_sha256"):
        sec["notes"].append(
            f"{funnel['pool_rows_without_sha256']:,} pool rows without sha256: kept, not exact-deduplicated"
        )
    return sec


# ---------------------------------------------------------------- render


def _step_row(s: Mapping) -> list[str]:
    removed = "" if s.get("removed") is None else num(s["removed"])
    return [esc(s["name"]), num(s["remaining"]), removed, esc(s["why"])]


def body(r: Mapping) -> str:
    sec = r["funnel"]
    out = section_head(r["ingest"]) + section_head(sec)
    steps = sec.get("steps") or []
    if steps:
        out += figure(plots.funnel_chart(steps), "funnel chart")
        out += table(["step", "remaining", "removed", "why"], [_step_row(s) for s in steps], num_cols=(1, 2))
    errors = r["ingest"].get("errors") or []
    if errors:
        rows = [[esc(m), num(n)] for m, n in errors]
        out += "<h3>Why inputs failed at ingest</h3>"
        out += table(["error message (shard index)", "rows"], rows, num_cols=(1,))
    caps = r["captions"].get("status") or {}
    if caps:
        chips = status_chips(sorted(caps.items()))
        out += (
            f"<p>Caption job ({esc(r['captions'].get('rows'))} rows): {chips}; "
            'reasons under <a href="#captions">Captions</a>.</p>'
        )
    return out


LEAD = (
    "How many images survive each step, and why the others were dropped (the stage rules are "
    "<code>stages/_stages.json</code>, the counts <code>stages/funnel.json</code>)."
)
SECTION = Section("funnel", "Funnel", "Funnel: from ingest to stage3", LEAD, body)
