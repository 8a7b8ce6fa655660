"""`unicap report`: one self-contained HTML page about a run folder.

    unicap report --data demo --out report.html
    unicap report --data demo --out report.html --truth demo/heldout --truth demo/data  # score captions here

The page (images inlined as data URIs, no script, nothing loaded from elsewhere) shows the funnel from
ingest to stage3 with the reason for every drop, caption statuses, lengths and failures, caption accuracy
against the synthetic answer key, CLIP and aesthetic scores per stage, a gallery of images with their
captions, training loss curves, sample grids and prompt adherence. It reads the conventional layout:

    DIR/data/ (shards; data/truth/ on the synthetic set)   DIR/captions/   DIR/heldout/, DIR/heldout_captions/
    DIR/scores/   DIR/stages/   DIR/runs/stage{1,2,3}/   DIR/adherence/adherence.json
    DIR/adherence_*/adherence.json (more prompt languages or levels, e.g. the demo's adherence_zh/)

A part that is missing becomes a section that says so and how to produce it. The report only reads.
Each section has one module that reads its part into a plain dict and writes its HTML (funnel.py,
captions.py, accuracy.py, scores.py, gallery.py, training.py, adherence.py; overview.py sums them up);
run_folder.py holds the layout and the shared readers, markup.py the shared HTML pieces, plots.py the
figures (matplotlib), images.py the inlined images; collect.py runs every section's reader, page.py
assembles the page.

Storage: `--data`, `--truth` and `--out` are each a local path or a URI (s3://, gs://, ...): everything is read
through unicap.storage (images included, as bytes), so a run folder in a bucket gives the same page as the same
folder on a local disk, and the page is written whole. A bucket that is missing or cannot be read is a one-line
error before anything is read.

`--truth T` (a synthetic set: `unicap synth --out T`'s T or T/truth) scores each caption folder of the run
whose keys are in T's answer key (heldout_captions/, captions/) with unicap.eval_captions, as
`unicap eval-captions` does; without it, the folders' `_eval.json` are shown.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable

from unicap import storage
from unicap.report import collect, page
from unicap.report.run_folder import parquet_files
from unicap.storage import Location

TRUTH_HELP = (
    "a synthetic set's answer key (synth's DIR or DIR/truth), e.g. DIR/heldout or DIR/data: the "
    "run's caption folders with keys in it are scored against it (repeat for several)"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="the run folder (e.g. the demo's `demo`), a local path or a URI")
    p.add_argument("--out", required=True, help="the HTML file to write (e.g. report.html), a local path or a URI")
    p.add_argument("--truth", action="append", default=[], metavar="DIR", help=TRUTH_HELP)


def build(
    data: str | os.PathLike | Location, truth: Iterable[str | os.PathLike | Location] = (), on_error=None
) -> tuple[str, dict]:
    """(the page, the collected report) of run folder `data` (a local path or a URI)."""
    report = collect.collect(data, truth, on_error=on_error)
    return page.render(report), report


def run(args: argparse.Namespace) -> int:
    out = storage.resolve(args.out)
    for given in (args.data, *args.truth):
        loc = storage.resolve(given)
        if not loc.is_local:
            storage.check_readable(loc)  # a missing bucket or bad credentials: one line, before anything is read
    if not out.is_local:
        storage.check_writable(out.parent)  # before the page is built
    for truth in args.truth:
        if not parquet_files(collect.truth_paths(truth)[0]):
            raise FileNotFoundError(
                f"--truth {truth}: no answer key there (give `unicap synth --out DIR`'s DIR or DIR/truth)"
            )
    debug = os.environ.get("UNICAP_DEBUG", "") not in ("", "0")

    def on_error(name: str, e: Exception) -> None:
        if debug:
            raise e
        print(f"unicap report: warning: section {name}: {type(e).__name__}: {e}", file=sys.stderr)

    html, report = build(args.data, args.truth, on_error)
    out.write_text(html)  # whole: a local temporary renamed, or one upload
    missing = sum(len(s.get("missing") or []) for s in report.values() if isinstance(s, dict))
    print(f"report: {out} ({len(html.encode()) / 1e6:.1f} MB); {missing} missing part(s) named on the page")
    return 0
