"""`unicap eval-captions`: any captioner's output scored against the synthetic answer key.

    unicap synth --out data/heldout --n 256 --seed 1
    unicap caption --input data/heldout --output data/heldout_captions --model PATH
    unicap eval-captions --captions data/heldout_captions --truth data/heldout [--out metrics.json]
    unicap eval-captions --captions s3://bucket/heldout_captions --truth s3://bucket/heldout

Every path may be a local folder or a URI (unicap.storage).

The answer key of a truth row is its scene graph, regenerated from the row's `source`
(synth://seed=S/index=I) by datagen.synth and checked against the row: the captions synth writes for
that scene must be the row's captions, so a truth folder made by another version of synth is refused,
never silently mis-scored. The scoring itself (parser, facts, metrics) is unicap.eval_captions.
Prints a table per level x language, writes the metrics as JSON (default CAPTIONS/_eval.json).
"""

from __future__ import annotations

import argparse
import os

from datagen import synth
from unicap import eval_captions, storage
from unicap.contract import caption as caption_record
from unicap.storage import Location

PathLike = str | os.PathLike | Location


class AnswerKeyError(ValueError):
    """A truth folder that is not (or no longer) the synthetic answer key; the message says why."""


def parquet_files(folder: Location) -> list[Location]:
    """The Parquet files a reader of `folder` sees: hidden (".") and private ("_") names excluded."""
    return [f for f in folder.files(".parquet") if not f.name.startswith("_")]


def truth_folder(path: PathLike) -> Location:
    """A synth output folder or its truth/ folder (local or a URI) -> the folder of truth Parquet files."""
    loc = storage.resolve(path)
    if loc.join("truth").is_dir():
        loc = loc.join("truth")
    if not parquet_files(loc):
        raise AnswerKeyError(f"{loc}: no truth Parquet files (give `unicap synth --out DIR`'s DIR or DIR/truth)")
    return loc


def caption_files(path: PathLike) -> list[Location]:
    """A caption folder's Parquet files, or the one file `path` names."""
    loc = storage.resolve(path)
    if loc.is_dir():
        files = parquet_files(loc)
    else:
        files = [loc] if loc.is_file() else []
    if not files:
        raise AnswerKeyError(f"{loc}: no caption Parquet files")
    return files


def load_answer_key(truth: PathLike) -> dict[str, eval_captions.Scene]:
    """key -> scene of every truth row, each checked against the captions synth writes for it."""
    scenes: dict[str, eval_captions.Scene] = {}
    for f in parquet_files(truth_folder(truth)):
        rows = f.read_parquet().to_pylist()
        for row in rows:
            scene = synth.scene_from_source(row.get("source"))
            if scene is None:
                raise AnswerKeyError(
                    f"{f}: row {row['key']} has source {row.get('source')!r}, not a synthetic "
                    "image (synth://seed=S/index=I): only the synthetic set has an answer key"
                )
            expected = synth.captions(scene)
            differ = [c for c, text in expected.items() if c in row and row[c] != text]
            if differ:
                raise AnswerKeyError(
                    f"{f}: row {row['key']}: {differ[0]} is not what datagen.synth writes for "
                    f"{row['source']}: the truth was made by another version; re-run `unicap synth`"
                )
            scenes[row["key"]] = eval_captions.Scene.from_dict(synth.scene_dict(scene))
    return scenes


def read_captions(path: PathLike) -> tuple[list[dict], tuple[str, ...], tuple[str, ...]]:
    """Rows of every caption file, and the levels / languages the files declare (first-seen order)."""
    rows: list[dict] = []
    levels: list[str] = []
    languages: list[str] = []
    for f in caption_files(path):
        table = f.read_parquet()
        try:
            lv, lang = caption_record.levels_languages(table.schema)
        except caption_record.SchemaError as e:
            raise AnswerKeyError(f"{f}: {e}") from None
        levels += [x for x in lv if x not in levels]
        languages += [x for x in lang if x not in languages]
        rows += table.to_pylist()
    return rows, tuple(levels), tuple(languages)


def evaluate_folder(captions: PathLike, truth: PathLike) -> dict:
    """Metrics of a caption folder against a truth folder (unicap.eval_captions.evaluate), with the goal check."""
    rows, levels, languages = read_captions(captions)
    metrics = eval_captions.evaluate(rows, load_answer_key(truth), levels, languages)
    metrics["goal"] = eval_captions.goal_check(metrics)
    metrics["captions"], metrics["truth"] = str(captions), truth_folder(truth).uri
    models = sorted({str(r.get("model")) for r in rows})
    metrics["models"] = models
    return metrics


def metrics_file(captions: PathLike, out: PathLike | None = None) -> Location:
    """Where the metrics go: `out`, else _eval.json in the caption folder (beside a caption file)."""
    if out is not None:
        return storage.resolve(out)
    captions = storage.resolve(captions)
    return (captions if captions.is_dir() else captions.parent).join("_eval.json")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--captions", required=True, help="caption Parquet folder (or file) to score; a path or a URI")
    p.add_argument("--truth", required=True, help="the synthetic set: `unicap synth --out DIR`'s DIR or DIR/truth")
    p.add_argument("--out", default=None, help="metrics JSON (default: CAPTIONS/_eval.json)")


def run(args: argparse.Namespace) -> int:
    for given in (args.captions, args.truth):  # one line for a missing bucket or refused credentials
        if not storage.resolve(given).is_local:
            storage.check_readable(given)
    out = metrics_file(args.captions, args.out)
    if not out.is_local:
        storage.check_writable(out.parent)
    try:
        metrics = evaluate_folder(args.captions, args.truth)
    except AnswerKeyError as e:
        print(f"error: {e}")
        return 2
    out.write_json(metrics)
    print(eval_captions.format_table(metrics))
    goal = metrics["goal"]
    verdict = "met" if goal["met"] else f"not met ({len(goal['misses'])} misses, e.g. {goal['misses'][0]})"
    print(f"goal (ok >= 95%, recall of colour/shape/background >= 0.9, hallucination <= 5%): {verdict}")
    print(f"metrics: {out}")
    return 0
