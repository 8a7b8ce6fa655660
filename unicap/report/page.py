"""The report page: one self-contained HTML document (CSS inline, images as data URIs, no script).

Every string that comes from the run (captions are model output, keys, error details, prompts, paths)
goes through `esc` (html.escape); the Content-Security-Policy forbids scripts and every remote load, so
even markup that slipped through could neither run nor fetch anything.
"""

from __future__ import annotations

import datetime as dt
import html
import re
from collections.abc import Iterable, Mapping

from unicap import eval_captions
from unicap.contract import manifest
from unicap.report import plots

SAMPLE_WIDTH = 640  # px: sample grids narrower than this are enlarged (pixelated) to it
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
NAV = (
    ("overview", "Overview"),
    ("funnel", "Funnel"),
    ("captions", "Captions"),
    ("accuracy", "Accuracy"),
    ("scores", "Scores"),
    ("gallery", "Gallery"),
    ("training", "Training"),
    ("samples", "Samples"),
    ("adherence", "Adherence"),
)

CSS = """
:root { --ink:#1f2933; --muted:#616e7c; --line:#e4e7eb; --bg:#f5f7fa; --card:#fff; --accent:#4c78a8;
        --good:#e3f4e1; --good-ink:#1e6b2a; --mid:#fff3d6; --mid-ink:#8a5a00; --bad:#fde2e1; --bad-ink:#a61b1b; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.5 -apple-system, "Segoe UI", Roboto, "Noto Sans", "Noto Sans CJK SC", sans-serif;
       color:var(--ink); background:var(--bg); }
header { background:#1f2933; color:#fff; padding:22px 32px 16px; }
header h1 { margin:0 0 4px; font-size:22px; font-weight:600; }
header .sub { color:#cbd2d9; font-size:13px; }
header code { color:#fff; background:rgba(255,255,255,.12); }
nav { position:sticky; top:0; z-index:5; background:#fff; border-bottom:1px solid var(--line); padding:0 24px;
      display:flex; flex-wrap:wrap; gap:2px; }
nav a { color:var(--muted); text-decoration:none; padding:10px 10px; font-size:13px; border-bottom:2px solid transparent; }
nav a:hover { color:var(--ink); border-bottom-color:var(--accent); }
main { max-width:1240px; margin:0 auto; padding:20px 24px 60px; }
section { background:var(--card); border:1px solid var(--line); border-radius:8px; padding:18px 22px 20px;
          margin:0 0 18px; scroll-margin-top:52px; }
h2 { margin:0 0 2px; font-size:18px; }
h3 { margin:18px 0 6px; font-size:15px; }
p.lead { margin:0 0 12px; color:var(--muted); }
code { font:12px/1.4 ui-monospace, "DejaVu Sans Mono", monospace; background:#f0f2f5; padding:1px 4px; border-radius:3px;
       overflow-wrap:anywhere; }
table { border-collapse:collapse; margin:8px 0; font-size:13px; }
th, td { border-bottom:1px solid var(--line); padding:5px 9px; text-align:left; vertical-align:top; }
th { color:var(--muted); font-weight:600; background:#fafbfc; }
td.num, th.num { text-align:right; font-variant-numeric:tabular-nums; white-space:nowrap; }
.scroll { overflow-x:auto; }
img.figure { max-width:100%; height:auto; display:block; margin:6px 0; }
.missing { border-left:4px solid #f0b429; background:#fffbea; padding:8px 12px; margin:8px 0; border-radius:0 4px 4px 0; }
.error { border-left:4px solid #e12d39; background:#ffeeee; padding:8px 12px; margin:8px 0; border-radius:0 4px 4px 0; }
.note { color:var(--muted); font-size:13px; margin:6px 0; }
.note::before { content:"ℹ "; }
.tiles { display:grid; grid-template-columns:repeat(auto-fill, minmax(170px, 1fr)); gap:10px; margin:6px 0 12px; }
.tile { border:1px solid var(--line); border-radius:6px; padding:10px 12px; background:#fafbfc; }
.tile .v { font-size:20px; font-weight:600; }
.tile .k { color:var(--muted); font-size:12px; }
.badge { display:inline-block; padding:0 7px; border-radius:9px; font-size:11.5px; font-weight:600; white-space:nowrap; }
.ok, td.good { background:var(--good); color:var(--good-ink); }
.partial, td.mid { background:var(--mid); color:var(--mid-ink); }
.failed, td.bad { background:var(--bad); color:var(--bad-ink); }
.neutral { background:#e4e7eb; color:#3e4c59; }
.items { display:grid; gap:14px; }
.item { display:grid; grid-template-columns:260px 1fr; gap:16px; border:1px solid var(--line); border-radius:6px; padding:12px; }
.item .thumb img { max-width:256px; max-height:256px; border-radius:4px; border:1px solid var(--line); display:block; }
.noimg { width:200px; height:120px; display:flex; align-items:center; justify-content:center; text-align:center;
         background:#f0f2f5; color:var(--muted); font-size:12px; border-radius:4px; padding:8px; }
.meta { color:var(--muted); font-size:12px; margin-top:6px; overflow-wrap:anywhere; }
table.caps { width:100%; table-layout:fixed; margin:0; }
table.caps th:first-child { width:64px; }
.cap { white-space:pre-wrap; overflow-wrap:anywhere; }
.truth { color:var(--muted); font-size:12px; margin-top:4px; white-space:pre-wrap; overflow-wrap:anywhere;
         border-top:1px dashed var(--line); padding-top:3px; }
.truth b { font-weight:600; }
.examples { display:grid; gap:8px; }
.example { display:grid; grid-template-columns:100px 1fr; gap:10px; align-items:start; }
.example img { max-width:96px; max-height:96px; border-radius:3px; border:1px solid var(--line); }
.samples figure { margin:8px 0 18px; }
.samples img { width:100%; height:auto; display:block; image-rendering:auto; border-radius:4px; }
.prompts { display:grid; gap:6px; margin-top:4px; }
.prompts div { font-size:12px; color:var(--muted); overflow-wrap:anywhere; text-align:center; }
.adh { display:grid; grid-template-columns:repeat(auto-fill, minmax(330px, 1fr)); gap:12px; }
.adh .pair { display:flex; gap:8px; margin:6px 0; }
.adh .pair figure { margin:0; }
.adh .pair img { width:150px; height:auto; border-radius:4px; border:1px solid var(--line); display:block; }
.adh figcaption { font-size:11px; color:var(--muted); text-align:center; }
.legend { font-size:12px; color:var(--muted); }
details summary { cursor:pointer; color:var(--accent); }
footer { color:var(--muted); font-size:12px; text-align:center; padding:16px; }
"""


def esc(value) -> str:
    """Any value as HTML text: nothing the run wrote can become markup."""
    return html.escape("" if value is None else str(value), quote=True)


def code_spans(text: str) -> str:
    """Escaped text with `backticked` parts as <code>."""
    parts = str(text).split("`")
    return "".join(f"<code>{esc(p)}</code>" if i % 2 else esc(p) for i, p in enumerate(parts))


def num(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.3f}"
    return f"{v:,}" if isinstance(v, int) else esc(v)


def pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


def level_class(v: float | None, good: float = 0.9, mid: float = 0.6, higher_is_better: bool = True) -> str:
    if v is None:
        return ""
    if not higher_is_better:
        v, good, mid = 1 - v, 1 - good, 1 - mid
    return "good" if v >= good else "mid" if v >= mid else "bad"


def badge(text: str, kind: str = "neutral") -> str:
    return f'<span class="badge {esc(kind)}">{esc(text)}</span>'


def status_badge(status: str | None) -> str:
    return badge(status or "no caption row", status if status in ("ok", "partial", "failed") else "neutral")


def figure(uri: str | None, alt: str) -> str:
    return f'<img class="figure" src="{uri}" alt="{esc(alt)}">' if uri else ""


def section_head(sec: Mapping) -> str:
    """The missing parts, a read error and the notes of a section."""
    out = []
    if sec.get("error"):
        out.append(f'<div class="error"><b>Could not read this part:</b> {esc(sec["error"])}</div>')
    for what, how in sec.get("missing") or []:
        out.append(f'<div class="missing"><b>Missing:</b> {esc(what)}. Produce it with {code_spans(how)}.</div>')
    out += [f'<div class="note">{code_spans(n)}</div>' for n in sec.get("notes") or []]
    return "".join(out)


def section(sid: str, title: str, lead: str, body: str) -> str:
    return f'<section id="{sid}"><h2>{esc(title)}</h2><p class="lead">{lead}</p>{body}</section>'


def table(head: Iterable[str], rows: Iterable[Iterable[str]], num_cols: Iterable[int] = ()) -> str:
    """A table of already-escaped cells; columns in num_cols right-aligned."""
    nums = set(num_cols)
    h = "".join(f'<th class="num">{c}</th>' if i in nums else f"<th>{c}</th>" for i, c in enumerate(head))
    body = "".join(
        "<tr>"
        + "".join(f'<td class="num">{c}</td>' if i in nums else f"<td>{c}</td>" for i, c in enumerate(r))
        + "</tr>"
        for r in rows
    )
    return f'<div class="scroll"><table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table></div>'


# ---------------------------------------------------------------- sections


def overview(r: Mapping) -> str:
    tiles = []
    ing, caps, funnel = r["ingest"], r["captions"], r["funnel"].get("funnel") or {}
    if ing.get("rows") is not None:
        tiles.append((f"{ing['successes']:,} / {ing['rows']:,}", "images in the shards / input rows"))
    if caps.get("rows"):
        status = caps.get("status") or {}
        n = sum(status.values()) or caps["rows"]
        tiles.append((pct(status.get("ok", 0) / n), f"captions ok ({n:,} rows)"))
    for stage in manifest.STAGES:
        if funnel.get(stage):
            tiles.append((f"{funnel[stage]['selected']:,}", f"{stage} images"))
    for stage, info in r["training"].get("stages", {}).items():
        if info.get("loss"):
            tiles.append((f"{info['loss'][-1]:.3f}", f"{stage} loss at step {info['steps'][-1]:,}"))
    for t in r["accuracy"].get("tables", []):
        m = t.get("metrics") or {}
        if isinstance(m.get("goal"), dict):
            tiles.append(("met" if m["goal"].get("met") else "not met", f"caption goal, {t['title']}"))
    tile_html = "".join(f'<div class="tile"><div class="v">{esc(v)}</div><div class="k">{esc(k)}</div></div>'
                        for v, k in tiles)  # fmt: skip
    missing = [(sid, what) for sid, key in (("funnel", "funnel"), ("captions", "captions"), ("accuracy", "accuracy"),
               ("scores", "scores"), ("gallery", "gallery"), ("training", "training"), ("adherence", "adherence"))
               for what, _ in r[key].get("missing") or []]  # fmt: skip
    errors = [(sid, r[sid]["error"]) for sid in ("ingest", "funnel", "captions", "accuracy", "scores", "gallery",
              "training", "adherence", "heldout_gallery") if sid in r and r[sid].get("error")]  # fmt: skip
    body = f'<div class="tiles">{tile_html}</div>' if tiles else ""
    if missing or errors:
        items = "".join(f'<li><a href="#{sid}">{esc(sid)}</a>: {esc(what)}</li>' for sid, what in missing)
        items += "".join(f'<li><a href="#{sid}">{esc(sid)}</a>: could not read: {esc(e)}</li>' for sid, e in errors)
        body += f"<h3>Not in this folder yet</h3><ul>{items}</ul><p class='note'>Each section says how to produce its part.</p>"
    else:
        body += "<p>Every part of a run is here.</p>"
    return section("overview", "Overview", "What this run holds at a glance. The data flows top to bottom: "
                   "images are ingested into shards, captioned at four levels in two languages, scored with CLIP "
                   "and an aesthetic head, cut into three training stages, and Next-DiT is trained on each.", body)  # fmt: skip


def funnel_section(r: Mapping) -> str:
    sec = r["funnel"]
    body = section_head(r["ingest"]) + section_head(sec)
    steps = sec.get("steps") or []
    if steps:
        body += figure(plots.funnel_chart(steps), "funnel chart")
        rows = [[esc(s["name"]), num(s["remaining"]), "" if s.get("removed") is None else num(s["removed"]), esc(s["why"])]
                for s in steps]  # fmt: skip
        body += table(["step", "remaining", "removed", "why"], rows, num_cols=(1, 2))
    errors = r["ingest"].get("errors") or []
    if errors:
        body += "<h3>Why inputs failed at ingest</h3>" + table(
            ["error message (shard index)", "rows"], [[esc(m), num(n)] for m, n in errors], num_cols=(1,)
        )
    caps = r["captions"].get("status") or {}
    if caps:
        chips = " ".join(status_badge(k) + f" {v:,}" for k, v in sorted(caps.items()))
        body += f'<p>Caption job ({esc(r["captions"].get("rows"))} rows): {chips}; reasons under <a href="#captions">Captions</a>.</p>'
    return section("funnel", "Funnel: from ingest to stage3",
                   "How many images survive each step, and why the others were dropped (the stage rules are "
                   "<code>stages/_stages.json</code>, the counts <code>stages/funnel.json</code>).", body)  # fmt: skip


def captions_section(r: Mapping) -> str:
    sec = r["captions"]
    body = section_head(sec)
    status = sec.get("status") or {}
    if status:
        summary = sec.get("summary") or {}
        model = (summary.get("last_run") or {}).get("model")
        body += "<p>Status of every row: " + " ".join(status_badge(k) + f" {v:,}" for k, v in sorted(status.items()))
        body += (f" &nbsp;·&nbsp; model <code>{esc(model)}</code>" if model else "") + "</p>"
    levels, languages = sec.get("levels") or [], sec.get("languages") or []
    hist = plots.length_histograms(sec.get("lengths") or {}, sec.get("truth_lengths") or {}, levels, languages)
    if hist:
        body += "<h3>Caption lengths per level × language</h3>"
        body += ('<p class="legend">Blue bars: this run\'s captions; grey: the answer key (the synthetic set\'s exact '
                 "captions), when the pool is synthetic. Words for English, characters for Chinese.</p>")  # fmt: skip
        if not any((sec.get("lengths") or {}).values()) and sec.get("rows"):
            body += '<div class="note">None of this run\'s captions passed their checks: only the answer key is drawn.</div>'
        body += figure(hist, "caption length histograms")
    reasons = sec.get("reasons") or []
    if reasons:
        body += "<h3>Failures by reason</h3>"
        rows = [[badge(x["reason"], "failed"), num(x["rows"]), num(x["captions"]), num(x["job_total"]),
                 esc(", ".join(f"{c.removeprefix('caption_')} {n:,}" for c, n in x["columns"][:8]))] for x in reasons]  # fmt: skip
        body += table(
            ["reason", "rows", "captions", "job total", "where (caption column: count)"],
            rows,
            num_cols=(1, 2, 3),
        )
        body += (
            '<p class="legend">rows / captions: in the rows read; job total: <code>captions/_summary.json</code>.</p>'
        )
        for x in reasons:
            ex = []
            for e in x["examples"]:
                img = (
                    f'<img src="{e["thumb"]}" alt="{esc(e["key"])}">'
                    if e.get("thumb")
                    else '<div class="noimg">no image</div>'
                )
                said = f'<div class="cap">the model wrote: {esc(e["text"])}</div>' if e.get("text") else ""
                ex.append(f'<div class="example">{img}<div><code>{esc(e["key"])}</code> {status_badge(e["status"])} '
                          f'{esc(e["column"] or "whole image")}<div class="cap">{esc(e["detail"])}</div>{said}</div></div>')  # fmt: skip
            body += f"<details><summary>{esc(x['reason'])}: examples</summary><div class='examples'>{''.join(ex)}</div></details>"
    elif status:
        body += "<p>No caption failed.</p>"
    return section("captions", "Captions", "The captioning job's output: what share of rows came out ok, how long "
                   "the captions are at each level and language, and why the others failed.", body)  # fmt: skip


def accuracy_table(m: Mapping) -> str:
    """unicap.eval_captions' metrics as a table: recall per kind, precision of objects, hallucination."""
    kinds = eval_captions.KINDS
    head = ["caption", "present", "right lang.", *[f"recall<br>{esc(k)}" for k in kinds], "precision<br>object",
            "CHAIR<sub>i</sub>", "CHAIR<sub>s</sub>"]  # fmt: skip
    rows = []
    for col, c in (m.get("columns") or {}).items():
        kk, h = c.get("kinds") or {}, c.get("hallucination") or {}
        cells = [esc(col.removeprefix("caption_")), pct(c.get("present_share")), pct(c.get("right_language"))]
        cells += [(kk.get(k) or {}).get("recall") for k in kinds]
        cells += [(kk.get("object") or {}).get("precision"), h.get("instance_rate"), h.get("caption_rate")]
        rows.append(cells)
    body = "<thead><tr>" + "".join(f'<th class="num">{c}</th>' if i else f"<th>{c}</th>" for i, c in enumerate(head))
    body += "</tr></thead><tbody>"
    for cells in rows:
        tds = [f"<td>{cells[0]}</td>", f'<td class="num">{cells[1]}</td>', f'<td class="num">{cells[2]}</td>']
        for i, v in enumerate(cells[3:]):
            hallucination = i >= len(kinds) + 1
            cls = level_class(v, good=0.05 if hallucination else 0.9, mid=0.3 if hallucination else 0.6,
                              higher_is_better=not hallucination)  # fmt: skip
            tds.append(f'<td class="num {cls}">{"–" if v is None else f"{v:.2f}"}</td>')
        body += "<tr>" + "".join(tds) + "</tr>"
    return f'<div class="scroll"><table>{body}</tbody></table></div>'


def accuracy_section(r: Mapping) -> str:
    sec = r["accuracy"]
    body = section_head(sec)
    for t in sec.get("tables") or []:
        m = t.get("metrics") or {}
        status = " ".join(status_badge(k) + f" {v:,}" for k, v in sorted((m.get("status") or {}).items(), key=str))
        goal = m.get("goal") or {}
        verdict = badge("goal met", "ok") if goal.get("met") else badge("goal not met", "failed") if goal else ""
        body += f"<h3>{esc(t['title'])} {verdict}</h3>"
        body += (f'<p class="legend">{esc(m.get("rows"))} rows ({status}), missing {esc(m.get("missing"))}, without '
                 f'truth {esc(m.get("rows_without_truth"))}; models {esc(", ".join(m.get("models") or []))}; '
                 f"source <code>{esc(t['source'])}</code></p>")  # fmt: skip
        body += accuracy_table(m)
        misses = goal.get("misses") or []
        if misses:
            shown = "".join(f"<li>{esc(x)}</li>" for x in misses[:6])
            more = f"<li>… and {len(misses) - 6} more</li>" if len(misses) > 6 else ""
            body += (
                f"<details><summary>why the goal is not met ({len(misses)})</summary><ul>{shown}{more}</ul></details>"
            )
    if sec.get("tables"):
        body += ('<p class="legend">Recall: facts of the image a caption states / facts (– : the level is not asked '
                 "for that kind); precision: mentions that are true / mentions; CHAIR<sub>i</sub>: object mentions not "
                 "in the image / object mentions; CHAIR<sub>s</sub>: captions with at least one. Goal: ok on ≥ 95% of "
                 "rows, recall of colour, shape and background ≥ 0.9, CHAIR<sub>i</sub> ≤ 0.05 "
                 "(<code>unicap/eval_captions.py</code>).</p>")  # fmt: skip
    return section("accuracy", "Caption accuracy against the answer key", "The synthetic images' content is "
                   "known exactly, so every caption can be checked: what it gets right, what it misses, what it "
                   "invents.", body)  # fmt: skip


def scores_section(r: Mapping) -> str:
    sec = r["scores"]
    body = section_head(sec)
    series = sec.get("series") or {}
    clip_label = (
        "CLIP score (mean of " + ", ".join(c.removeprefix("clip_") for c in sec.get("clip_columns") or []) + ")"
    )
    fig = plots.score_distributions(series, clip_label)
    if fig:
        body += figure(fig, "score distributions")
        rows = []
        for name, s in series.items():
            row = [esc(name), num(sec["counts"].get(name))]
            for metric in ("clip", "aesthetic"):
                v = sorted(s.get(metric) or [])
                row += [
                    f"{v[len(v) // 2]:.3f}" if v else "–",
                    f"{v[len(v) // 10]:.3f} – {v[(9 * len(v)) // 10]:.3f}" if v else "–",
                ]
            rows.append(row)
        body += table(["", "images", "CLIP median", "CLIP 10–90%", "aesthetic median", "aesthetic 10–90%"], rows,
                      num_cols=(1, 2, 3, 4, 5))  # fmt: skip
        if sec.get("clip_model"):
            body += f'<p class="legend">CLIP model <code>{esc(sec["clip_model"])}</code>.</p>'
    return section("scores", "CLIP and aesthetic scores per stage", "How well the captions match their images "
                   "(CLIP cosine) and how good the images look (aesthetic head), for the scored pool and each "
                   "stage: later stages should sit further right.", body)  # fmt: skip


def gallery_items(sec: Mapping) -> str:
    levels, languages = sec.get("levels") or [], sec.get("languages") or []
    out = []
    for it in sec.get("items") or []:
        img = (f'<img src="{it["thumb"]}" alt="{esc(it["key"])}">' if it.get("thumb")
               else '<div class="noimg">image not found in the shards</div>')  # fmt: skip
        size = f"{it['width']}×{it['height']} px · " if it.get("width") else ""
        meta = (f'<div class="meta"><code>{esc(it["key"])}</code><br>{esc(size)}shard {esc(it["shard"])} · from '
                f'{esc(it["origin"])}<br>{status_badge(it.get("status"))}</div>')  # fmt: skip
        head = "<tr><th></th>" + "".join(f"<th>{esc(lang)}</th>" for lang in languages) + "</tr>"
        rows = []
        for lv in levels:
            cells = []
            for lang in languages:
                col = f"caption_{lv}_{lang}"
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
                cells.append(f"<td>{cell}</td>")
            rows.append(f"<tr><th>{esc(lv)}</th>{''.join(cells)}</tr>")
        whole = f'<div class="error">{esc(it["whole_error"])}</div>' if it.get("whole_error") else ""
        out.append(f'<div class="item"><div class="thumb">{img}{meta}</div><div>{whole}'
                   f'<table class="caps">{head}{"".join(rows)}</table></div></div>')  # fmt: skip
    return f'<div class="items">{"".join(out)}</div>' if out else ""


def gallery_section(r: Mapping) -> str:
    sec = r["gallery"]
    body = section_head(sec) + gallery_items(sec)
    held = r.get("heldout_gallery")
    if held:
        body += "<h3>Held-out synthetic images</h3>" + section_head(held) + gallery_items(held)
    return section("gallery", "Gallery: images and their captions", "Images from the shards with their captions "
                   "at every level and language, the best of the last stage first. Under each caption, in grey, "
                   "the answer key when the images are synthetic.", body)  # fmt: skip


def training_section(r: Mapping) -> str:
    sec = r["training"]
    body = section_head(sec)
    stages = sec.get("stages") or {}
    rows = []
    for stage, info in stages.items():
        st = info.get("state") or {}
        loss = info.get("loss") or []
        rows.append([esc(stage), num(st.get("step")), num(st.get("samples_seen")), num(st.get("skipped_samples")),
                     num(st.get("skipped_steps")), num(st.get("world_size")), num(st.get("zero_stage")),
                     f"{loss[0]:.3f} → {loss[-1]:.3f}" if loss else "–"])  # fmt: skip
        for m in info.get("missing") or []:
            if "samples" not in m:
                body += f'<div class="missing"><b>{esc(stage)}:</b> missing {esc(m)}.</div>'
        if info.get("bad_lines"):
            body += f'<div class="note">{esc(stage)}: {info["bad_lines"]} lines of metrics.jsonl are not JSON; skipped.</div>'
    if rows:
        body += table(["stage", "steps", "samples seen", "skipped samples", "skipped steps", "ranks", "ZeRO",
                       "loss first → last"], rows, num_cols=(1, 2, 3, 4, 5, 6, 7))  # fmt: skip
    body += figure(plots.loss_curves(stages), "training loss per stage")
    return section("training", "Training loss per stage", "Next-DiT's flow-matching loss at every logged step "
                   "(<code>runs/stageN/metrics.jsonl</code>); each stage starts from the previous one's weights.", body)  # fmt: skip


def samples_section(r: Mapping) -> str:
    stages = r["training"].get("stages") or {}
    body = section_head({"missing": [m for m in r["training"].get("missing") or []]})
    for stage, info in stages.items():
        if not info.get("sample"):
            body += f'<div class="missing"><b>{esc(stage)}:</b> no sample grid ({esc(", ".join(info.get("missing") or []))}).</div>'
            continue
        prompts = info.get("prompts") or []
        natural = int(info["sample_width"])
        shown = natural if natural >= SAMPLE_WIDTH else min(SAMPLE_WIDTH, natural * 4)  # small grids enlarged
        pixelated = ' style="image-rendering:pixelated"' if shown > natural else ""
        labels = "".join(f"<div>{esc(p)}</div>" for p in prompts)
        grid = f'<div class="prompts" style="grid-template-columns:repeat({max(len(prompts), 1)}, 1fr)">{labels}</div>'
        steps = info.get("sample_steps") or []
        body += (f"<h3>{esc(stage)} · step {esc(info['sample_step'])}</h3><figure style=\"max-width:{shown}px\">"
                 f'<img src="{info["sample"]}" alt="{esc(stage)} samples"{pixelated}>{grid if prompts else ""}</figure>'
                 f'<p class="legend">{len(steps)} grid(s) saved; the latest shown. Prompts from the run\'s config '
                 "(<code>run.sample_prompts</code>), one per column.</p>")  # fmt: skip
    return section("samples", "Sample grids per stage", "Images generated from fixed prompts with each stage's EMA "
                   "weights (<code>runs/stageN/samples/</code>).", f'<div class="samples">{body}</div>')  # fmt: skip


def adherence_section(r: Mapping) -> str:
    sec = r["adherence"]
    body = section_head(sec)
    runs = sec.get("runs") or []
    for run in runs:
        if len(runs) > 1:
            p = run["data"].get("prompts") or {}
            body += f"<h3>{esc(run['folder'])}/ · {esc(p.get('level'))} {esc(p.get('language'))} prompts</h3>"
        body += _adherence_run(run)
    return section("adherence", "Prompt adherence", "Does the trained model draw what the prompt asks? Prompts "
                   "are the synthetic set's captions, so every attribute can be checked on the generated image.", body)  # fmt: skip


def _adherence_run(run: Mapping) -> str:
    """One adherence.json: its accuracy table and its examples beside their truth images."""
    data, body = run["data"], ""
    attrs = [str(a) for a in data.get("attributes") or []]
    facts = data.get("facts") or {}
    p = data.get("prompts") or {}
    body += (f'<p class="legend">{esc(p.get("n"))} prompts, level {esc(p.get("level"))}, language '
             f'{esc(p.get("language"))}, from {esc(p.get("truth"))}; images {esc("×".join(map(str, data.get("size") or [])))} px. '
             "A cell: the share of images whose attribute the checker found as the prompt says (n: facts checked).</p>")  # fmt: skip
    head = "<thead><tr><th>weights</th>" + "".join(f'<th class="num">{esc(a)}</th>' for a in attrs) + "</tr></thead>"
    rows = ""
    for name, accs in (data.get("rows") or {}).items():
        accs = accs if isinstance(accs, dict) else {}
        cells = ""
        for a in attrs:
            v = accs.get(a)
            n = (facts.get(name) or {}).get(a) if isinstance(facts.get(name), dict) else None
            shown = "–" if not isinstance(v, int | float) else f"{v:.2f}"
            nn = f'<br><span class="legend">n={esc(n)}</span>' if n is not None else ""
            cells += f'<td class="num {level_class(v if isinstance(v, int | float) else None)}">{shown}{nn}</td>'
        rows += f"<tr><th>{esc(name)}</th>{cells}</tr>"
    body += f'<div class="scroll"><table>{head}<tbody>{rows}</tbody></table></div>'
    cards = []
    for ex in run.get("examples") or []:
        verdicts = ex.get("verdicts") if isinstance(ex.get("verdicts"), dict) else {}
        chips = " ".join(badge(f"{'✓' if v else '✗'} {a}", "ok" if v else "failed") if isinstance(v, bool)
                         else badge(f"– {a}", "neutral") for a, v in verdicts.items())  # fmt: skip
        pair = ""
        for label, uri in (("answer key", ex.get("truth_uri")), (str(ex.get("weights", "")), ex.get("image_uri"))):
            inner = f'<img src="{uri}" alt="{esc(label)}">' if uri else '<div class="noimg">image missing</div>'
            pair += f"<figure>{inner}<figcaption>{esc(label)}</figcaption></figure>"
        cards.append(f'<div class="item" style="display:block"><div class="cap">{esc(ex.get("prompt"))}</div>'
                     f'<div class="pair">{pair}</div>{chips}</div>')  # fmt: skip
    if cards:
        body += f'<h3>Examples</h3><div class="adh">{"".join(cards)}</div>'
    return body


def render(report: Mapping, generated_at: dt.datetime | None = None) -> str:
    """The whole page for collect.collect's report."""
    when = (generated_at or dt.datetime.now(dt.UTC)).strftime("%Y-%m-%d %H:%M UTC")
    truth = "".join(f" · answer key <code>{esc(t)}</code>" for t in report.get("truth") or [])
    nav = "".join(f'<a href="#{sid}">{esc(title)}</a>' for sid, title in NAV)
    parts = [overview(report), funnel_section(report), captions_section(report), accuracy_section(report),
             scores_section(report), gallery_section(report), training_section(report), samples_section(report),
             adherence_section(report)]  # fmt: skip
    title = f"unicap report · {report['root']}"
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{esc(title)}</title>'
        f"<style>{CSS}</style></head><body>"
        f'<header><h1>unicap run report</h1><div class="sub">run folder <code>{esc(report["root"])}</code>{truth} · '
        f"generated {esc(when)} by <code>unicap report</code></div></header>"
        f"<nav>{nav}</nav><main>{''.join(parts)}</main>"
        "<footer>One self-contained page: every image is inlined; nothing is loaded from anywhere else.</footer>"
        "</body></html>\n"
    )


def strip_tags(page: str) -> str:
    """The page's text without markup (tests and the command's summary use it)."""
    return html.unescape(re.sub(r"<[^>]+>", " ", page))
