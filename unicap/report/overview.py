"""The Overview section: a tile per headline number, and every part the run folder lacks or could not read.

It collects nothing of its own: it reads the other sections' collected dicts.
"""

from __future__ import annotations

from collections.abc import Mapping

from unicap.contract import manifest
from unicap.report.markup import Section, esc, pct

LEAD = (
    "What this run holds at a glance. The data flows top to bottom: images are ingested into shards, captioned "
    "at four levels in two languages, scored with CLIP and an aesthetic head, cut into three training stages, "
    "and Next-DiT is trained on each."
)
PARTS = ("funnel", "captions", "accuracy", "scores", "gallery", "training", "adherence")  # each names its missing
COLLECTED = ("ingest", *PARTS, "heldout_gallery")  # every section collect.collect reads, each may hold an error


def _tile(value: str, label: str) -> str:
    return f'<div class="tile"><div class="v">{esc(value)}</div><div class="k">{esc(label)}</div></div>'


def tiles(r: Mapping) -> list[tuple[str, str]]:
    """(value, label) of each headline number the report has: images, captions ok, stage sizes, last loss,
    caption goals."""
    out = []
    ing, caps, funnel = r["ingest"], r["captions"], r["funnel"].get("funnel") or {}
    if ing.get("rows") is not None:
        out.append((f"{ing['successes']:,} / {ing['rows']:,}", "images in the shards / input rows"))
    if caps.get("rows"):
        status = caps.get("status") or {}
        n = sum(status.values()) or caps["rows"]
        out.append((pct(status.get("ok", 0) / n), f"captions ok ({n:,} rows)"))
    for stage in manifest.STAGES:
        if funnel.get(stage):
            out.append((f"{funnel[stage]['selected']:,}", f"{stage} images"))
    for stage, info in r["training"].get("stages", {}).items():
        if info.get("loss"):
            out.append((f"{info['loss'][-1]:.3f}", f"{stage} loss at step {info['steps'][-1]:,}"))
    for t in r["accuracy"].get("tables", []):
        m = t.get("metrics") or {}
        if isinstance(m.get("goal"), dict):
            out.append(("met" if m["goal"].get("met") else "not met", f"caption goal, {t['title']}"))
    return out


def body(r: Mapping) -> str:
    shown = tiles(r)
    missing = [(sid, what) for sid in PARTS for what, _ in r[sid].get("missing") or []]
    errors = [(sid, r[sid]["error"]) for sid in COLLECTED if sid in r and r[sid].get("error")]
    out = f'<div class="tiles">{"".join(_tile(v, k) for v, k in shown)}</div>' if shown else ""
    if not (missing or errors):
        return out + "<p>Every part of a run is here.</p>"
    items = "".join(f'<li><a href="#{sid}">{esc(sid)}</a>: {esc(what)}</li>' for sid, what in missing)
    items += "".join(f'<li><a href="#{sid}">{esc(sid)}</a>: could not read: {esc(e)}</li>' for sid, e in errors)
    note = "<p class='note'>Each section says how to produce its part.</p>"
    return out + f"<h3>Not in this folder yet</h3><ul>{items}</ul>{note}"


SECTION = Section("overview", "Overview", "Overview", LEAD, body)
