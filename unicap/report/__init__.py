"""`unicap report`: one self-contained HTML page about a run folder.

    unicap report --data demo --out report.html
    unicap report --data /data/run1 --out run1.html --truth /data/run1/data   # score the pool's captions too

The page (images inlined as data URIs, no script, nothing loaded from elsewhere) shows the funnel from
ingest to stage3 with the reason for every drop, caption statuses, lengths and failures, caption accuracy
against the synthetic answer key, CLIP and aesthetic scores per stage, a gallery of images with their
captions, training loss curves, sample grids and prompt adherence. It reads the conventional layout:

    DIR/data/ (shards; data/truth/ on the synthetic set)   DIR/captions/   DIR/heldout/, DIR/heldout_captions/
    DIR/scores/   DIR/stages/   DIR/runs/stage{1,2,3}/   DIR/adherence/adherence.json

A part that is missing becomes a section that says so and how to produce it. The report only reads:
collect.py reads the folders into plain dicts, plots.py draws the figures (matplotlib), page.py writes
the HTML. `--truth DIR` (a synthetic set: `unicap synth --out DIR`'s DIR or DIR/truth) scores DIR/captions
with unicap.eval_captions, as `unicap eval-captions` does.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from unicap.atomic import atomic_path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="the run folder (e.g. the demo's `demo`)")
    p.add_argument("--out", required=True, help="the HTML file to write (e.g. report.html)")
    p.add_argument("--truth", default=None, help="a synthetic set (synth's DIR or DIR/truth): score the run's "
                   "captions against its answer key")  # fmt: skip


def build(data: str | Path, truth: str | Path | None = None, on_error=None) -> tuple[str, dict]:
    """(the page, the collected report) of run folder `data`."""
    from unicap.report import collect, page

    report = collect.collect(data, truth, on_error=on_error)
    return page.render(report), report


def run(args: argparse.Namespace) -> int:
    if args.truth is not None and not Path(args.truth).exists():
        raise FileNotFoundError(f"--truth {args.truth}: no such folder")
    debug = os.environ.get("UNICAP_DEBUG", "") not in ("", "0")

    def on_error(name: str, e: Exception) -> None:
        if debug:
            raise e
        print(f"unicap report: warning: section {name}: {type(e).__name__}: {e}", file=sys.stderr)

    html, report = build(args.data, args.truth, on_error)
    out = Path(args.out)
    with atomic_path(out) as tmp:
        tmp.write_text(html, encoding="utf-8")
    missing = sum(len(s.get("missing") or []) for s in report.values() if isinstance(s, dict))
    print(f"report: {out} ({len(html.encode()) / 1e6:.1f} MB); {missing} missing part(s) named on the page")
    return 0
