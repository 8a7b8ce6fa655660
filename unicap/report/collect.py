"""Read a run folder into plain dicts, one per report section; nothing here writes or draws.

Each section's module (funnel, captions, accuracy, scores, gallery, training, adherence) holds the function
that reads its part; `collect` runs them all, each guarded so that one bad file costs only its section.
The names other code reads from here (`collect.truth_paths`, `collect.evaluate_against_answer_key`) are
re-exported below. The run folder and the answer keys are local paths or URIs, read through unicap.storage.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from unicap import storage
from unicap.report.accuracy import collect_accuracy, evaluate_against_answer_key, load_scenes, truth_paths
from unicap.report.adherence import collect_adherence
from unicap.report.captions import collect_captions
from unicap.report.funnel import collect_funnel, collect_ingest
from unicap.report.gallery import collect_gallery
from unicap.report.run_folder import RunFolder, empty_section
from unicap.report.scores import collect_scores
from unicap.report.training import collect_training
from unicap.storage import Location

__all__ = [  # what other code reads from here
    "RunFolder",
    "collect",
    "collect_accuracy",
    "collect_adherence",
    "collect_captions",
    "collect_funnel",
    "collect_gallery",
    "collect_ingest",
    "collect_scores",
    "collect_training",
    "evaluate_against_answer_key",
    "load_scenes",
    "truth_paths",
]


def collect(
    data: str | os.PathLike | Location, truth: Iterable[str | os.PathLike | Location] = (), on_error=None
) -> dict:
    """Every section of the report of run folder `data`, with the answer keys `truth` (synthetic sets);
    each a local path or a URI.
    A section whose files cannot be read becomes a section with that error (`on_error(name, exc)` is told
    first), so one bad file costs only its section."""
    run, truth = RunFolder(storage.resolve(data)), list(truth)
    if not run.root.is_dir():
        raise NotADirectoryError(f"{run.root}: not a folder (give the run folder, e.g. the demo's `demo`)")

    def guarded(name: str, fn, *args) -> dict:
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 - a report shows what it could read
            if on_error is not None:
                on_error(name, e)
            sec = empty_section()
            sec["error"] = f"{type(e).__name__}: {e}"
            return sec

    ingest = guarded("ingest", collect_ingest, run)
    funnel = guarded("funnel", collect_funnel, run, ingest)
    out = {
        "root": run.root.uri,
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
    counted_all = ok_scored is not None and not funnel.get("caption_status_sampled")
    if counted_all and out["captions"].get("rows") and ok_scored != ok_captions:
        funnel["notes"].append(
            f"the score files count {ok_scored:,} ok captions, {run.captions} holds {ok_captions:,}: the scores "
            "were computed with another caption folder (`unicap score --captions`) or before the captions changed"
        )
    if run.heldout.is_dir():
        out["heldout_gallery"] = guarded("heldout_gallery", lambda: collect_gallery(run, heldout=True))
    return out
