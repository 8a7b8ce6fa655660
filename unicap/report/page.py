"""The report page: one self-contained HTML document (CSS inline, images as data URIs, no script).

The page is the sections in SECTIONS order, each written by its own module (unicap/report/<section>.py,
beside the code that collects its part); markup.py holds the pieces they share. The Content-Security-Policy
forbids scripts and every remote load, so even markup that slipped through could neither run nor fetch
anything.
"""

from __future__ import annotations

import datetime as dt
import html
import re
from collections.abc import Mapping

from unicap.report import accuracy, adherence, captions, funnel, gallery, overview, scores, training
from unicap.report.markup import esc

SECTIONS = (
    overview.SECTION,
    funnel.SECTION,
    captions.SECTION,
    accuracy.SECTION,
    scores.SECTION,
    gallery.SECTION,
    training.TRAINING,
    training.SAMPLES,
    adherence.SECTION,
)
NAV = tuple((s.sid, s.nav) for s in SECTIONS)  # (anchor, link text) of the nav bar
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

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
nav a { color:var(--muted); text-decoration:none; padding:10px 10px; font-size:13px;
        border-bottom:2px solid transparent; }
nav a:hover { color:var(--ink); border-bottom-color:var(--accent); }
main { max-width:1240px; margin:0 auto; padding:20px 24px 60px; }
section { background:var(--card); border:1px solid var(--line); border-radius:8px; padding:18px 22px 20px;
          margin:0 0 18px; scroll-margin-top:52px; }
h2 { margin:0 0 2px; font-size:18px; }
h3 { margin:18px 0 6px; font-size:15px; }
p.lead { margin:0 0 12px; color:var(--muted); }
code { font:12px/1.4 ui-monospace, "DejaVu Sans Mono", monospace; background:#f0f2f5; padding:1px 4px;
       border-radius:3px;
       overflow-wrap:anywhere; }
table { border-collapse:collapse; margin:8px 0; font-size:13px; }
th, td { border-bottom:1px solid var(--line); padding:5px 9px; text-align:left; vertical-align:top; }
th { color:var(--muted); font-weight:600; background:#fafbfc; }
td.num, th.num { text-align:right; font-variant-numeric:tabular-nums; white-space:nowrap; }
.scroll { overflow-x:auto; }
img.figure { max-width:100%; height:auto; display:block; margin:6px 0; }
.missing { border-left:4px solid #f0b429; background:#fffbea; padding:8px 12px; margin:8px 0;
           border-radius:0 4px 4px 0; }
.error { border-left:4px solid #e12d39; background:#ffeeee; padding:8px 12px; margin:8px 0;
         border-radius:0 4px 4px 0; }
.note { color:var(--muted); font-size:13px; margin:6px 0; }
.note::before { content:"ℹ "; }
.tiles { display:grid; grid-template-columns:repeat(auto-fill, minmax(170px, 1fr)); gap:10px; margin:6px 0 12px; }
.tile { border:1px solid var(--line); border-radius:6px; padding:10px 12px; background:#fafbfc; }
.tile .v { font-size:20px; font-weight:600; }
.tile .k { color:var(--muted); font-size:12px; }
.badge { display:inline-block; padding:0 7px; border-radius:9px; font-size:11.5px; font-weight:600;
         white-space:nowrap; }
.ok, td.good { background:var(--good); color:var(--good-ink); }
.partial, td.mid { background:var(--mid); color:var(--mid-ink); }
.failed, td.bad { background:var(--bad); color:var(--bad-ink); }
.neutral { background:#e4e7eb; color:#3e4c59; }
.items { display:grid; gap:14px; }
.item { display:grid; grid-template-columns:260px 1fr; gap:16px; border:1px solid var(--line); border-radius:6px;
        padding:12px; }
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


def render(report: Mapping, generated_at: dt.datetime | None = None) -> str:
    """The whole page for collect.collect's report."""
    when = (generated_at or dt.datetime.now(dt.UTC)).strftime("%Y-%m-%d %H:%M UTC")
    truth = "".join(f" · answer key <code>{esc(t)}</code>" for t in report.get("truth") or [])
    nav = "".join(f'<a href="#{sid}">{esc(title)}</a>' for sid, title in NAV)
    parts = [s.render(report) for s in SECTIONS]
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
