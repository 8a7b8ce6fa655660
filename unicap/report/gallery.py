"""The Gallery section: images with their captions at every level and language, and the answer key's
beside them on the synthetic set; the pool's images first, then the held-out set's."""

from __future__ import annotations

from collections.abc import Mapping

from unicap.contract import caption as caption_record
from unicap.contract import manifest
from unicap.contract import shards as shard_contract
from unicap.report.captions import failures_of
from unicap.report.images import thumbnails
from unicap.report.markup import Section, badge, esc, section_head, status_badge, thumb
from unicap.report.run_folder import (
    THUMB_SIDE,
    RunFolder,
    by_shard,
    caption_levels_languages,
    empty_section,
    how_to,
    parquet_file,
    parquet_files,
    read_sample,
    rows_for_keys,
    stem,
)

GALLERY_SIZE = 8
HELDOUT_GALLERY_SIZE = 4
STATUS_ORDER = {"ok": 0, "partial": 1, "failed": 2}  # captioned images shown ok first

# ---------------------------------------------------------------- collect


def _item(key: str, shard: str, origin: str, row: Mapping, truth: Mapping, columns: list[str]) -> dict:
    """One image of the gallery from its caption row and its answer-key row (either may be empty)."""
    failures = failures_of(row.get("error"))
    whole = [f"{reason}: {detail}" for reason, col, detail in failures if not col]
    item = {"key": key, "shard": shard, "origin": origin}
    item.update(width=row.get("width") or truth.get("width"), height=row.get("height") or truth.get("height"))
    item.update(status=row.get("status"), model=row.get("model"), whole_error="; ".join(whole) or None)
    item["captions"] = {c: row.get(c) for c in columns}
    item["failed"] = {col: reason for reason, col, _ in failures if col}
    item["truth"] = {c: truth.get(c) for c in columns} if truth else None
    return item


def collect_gallery(run: RunFolder, *, heldout: bool = False) -> dict:
    """Images with their captions at every level and language (and the answer key's, when there is one):
    the best of the last stage first, on the held-out set its first images."""
    shards = run.heldout if heldout else run.data
    cap_dir = run.heldout_captions if heldout else run.captions
    truth_dir = run.heldout_truth if heldout else run.truth
    size = HELDOUT_GALLERY_SIZE if heldout else GALLERY_SIZE
    has_truth = truth_dir.is_dir()
    sec = empty_section(items=[], levels=[], languages=[], has_truth=has_truth)
    picked: list[tuple[str, str, str]] = []  # key, shard, where it was picked from
    locations: dict[str, str] = {}

    def pick(key: str, shard: str, origin: str) -> bool:
        """Add an image not picked yet while there is room; whether it was added."""
        if key in {p[0] for p in picked} or len(picked) >= size:
            return False
        picked.append((key, shard, origin))
        return True

    if not heldout:
        for stage in reversed(manifest.STAGES):
            path = run.manifest(stage)
            if len(picked) < size and path.is_file():
                with parquet_file(path) as m:
                    batch = next(m.iter_batches(batch_size=size, columns=["key", "shard", "location"]), None)
                for r in batch.to_pylist() if batch is not None else []:
                    if pick(r["key"], r["shard"], stage) and r.get("location"):
                        locations[r["shard"]] = r["location"]
    cap_files = parquet_files(cap_dir)
    source = cap_files or parquet_files(truth_dir)
    if len(picked) < size and source:
        df, _ = read_sample(source, ["key", "shard", "status"], 500)
        df = df.assign(_o=df["status"].map(STATUS_ORDER).fillna(3)).sort_values("_o", kind="stable")
        for r in df.itertuples(index=False):
            pick(r.key, r.shard, "held-out set" if heldout else "captions")
    if len(picked) < size:  # no captions: the first images of the shards
        for f in parquet_files(shards)[:size]:
            for r in f.read_parquet(columns=["key", "status"]).to_pylist():
                if r["status"] == shard_contract.SUCCESS:
                    pick(r["key"], stem(f), "shards")
    if not picked:
        sec["missing"].append((f"images in {shards}", how_to(run)["heldout" if heldout else "data"]))
        return sec
    levels, languages = caption_levels_languages(source) if source else ([], [])
    sec.update(levels=levels, languages=languages)
    columns = caption_record.caption_columns(levels, languages)
    keys = by_shard((k, s) for k, s, _ in picked)
    captions = rows_for_keys(cap_dir, keys) if cap_files else {}
    truth = rows_for_keys(truth_dir, keys) if has_truth else {}
    thumbs = thumbnails(shards, keys, THUMB_SIDE, locations)
    for key, shard, origin in picked:
        item = _item(key, shard, origin, captions.get(key) or {}, truth.get(key) or {}, columns)
        sec["items"].append({**item, "thumb": thumbs.get(key)})
    if not cap_files:
        sec["missing"].append((f"captions in {cap_dir}", how_to(run)["heldout" if heldout else "captions"]))
    return sec


# ---------------------------------------------------------------- render


def _caption_cell(it: Mapping, col: str) -> str:
    """A caption (or why there is none), with the answer key's caption under it when there is one."""
    text = (it.get("captions") or {}).get(col)
    if isinstance(text, str) and text.strip():
        cell = f'<div class="cap">{esc(text)}</div>'
    elif col in (it.get("failed") or {}):
        cell = badge(it["failed"][col], "failed")
    else:
        cell = badge("no caption", "neutral")
    truth = (it.get("truth") or {}).get(col)
    if truth and truth == text:
        cell += '<div class="truth">✓ the answer key says exactly this</div>'
    elif truth:
        cell += f'<div class="truth"><b>answer key:</b> {esc(truth)}</div>'
    return f"<td>{cell}</td>"


def _item_html(it: Mapping, levels: list[str], languages: list[str]) -> str:
    """One image: its thumbnail and where it is from, beside a table of its captions (levels x languages)."""
    img = thumb(it.get("thumb"), it["key"], "image not found in the shards")
    size = f"{it['width']}×{it['height']} px · " if it.get("width") else ""
    where = f"{esc(size)}shard {esc(it['shard'])} · from {esc(it['origin'])}"
    meta = f'<div class="meta"><code>{esc(it["key"])}</code><br>{where}<br>{status_badge(it.get("status"))}</div>'
    head = "<tr><th></th>" + "".join(f"<th>{esc(lang)}</th>" for lang in languages) + "</tr>"
    rows = []
    for lv in levels:
        cells = "".join(_caption_cell(it, f"caption_{lv}_{lang}") for lang in languages)
        rows.append(f"<tr><th>{esc(lv)}</th>{cells}</tr>")
    whole = f'<div class="error">{esc(it["whole_error"])}</div>' if it.get("whole_error") else ""
    captions = f'<table class="caps">{head}{"".join(rows)}</table>'
    return f'<div class="item"><div class="thumb">{img}{meta}</div><div>{whole}{captions}</div></div>'


def gallery_items(sec: Mapping) -> str:
    levels, languages = sec.get("levels") or [], sec.get("languages") or []
    out = [_item_html(it, levels, languages) for it in sec.get("items") or []]
    return f'<div class="items">{"".join(out)}</div>' if out else ""


def body(r: Mapping) -> str:
    sec = r["gallery"]
    out = section_head(sec) + gallery_items(sec)
    held = r.get("heldout_gallery")
    if held:
        out += "<h3>Held-out synthetic images</h3>" + section_head(held) + gallery_items(held)
    return out


LEAD = (
    "Images from the shards with their captions at every level and language, the best of the last stage first. "
    "Under each caption, in grey, the answer key when the images are synthetic."
)
SECTION = Section("gallery", "Gallery", "Gallery: images and their captions", LEAD, body)
