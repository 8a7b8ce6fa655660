"""`unicap eval-captions`: any captioner's output scored against the synthetic answer key.

    unicap synth --out data/heldout --n 256 --seed 1
    unicap caption --input data/heldout --output data/heldout_captions --model PATH
    unicap eval-captions --captions data/heldout_captions --truth data/heldout [--out metrics.json]

The answer key of a truth row is its scene graph, regenerated from the row's `source`
(synth://seed=S/index=I) by datagen.synth and checked against the row: the captions synth writes for
that scene must be the row's captions, so a truth folder made by another version of synth is refused,
never silently mis-scored. The scoring itself (parser, facts, metrics) is unicap.eval_captions.
Prints a table per level x language, writes the metrics as JSON (default CAPTIONS/_eval.json).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pyarrow.parquet as pq

from datagen import synth
from unicap import eval_captions
from unicap.atomic import visible_parquet_files, write_json
from unicap.contract import caption as caption_record


class AnswerKeyError(ValueError):
    """A truth folder that is not (or no longer) the synthetic answer key; the message says why."""


def truth_folder(path: str | Path) -> Path:
    """A synth output folder or its truth/ folder -> the folder of truth Parquet files."""
    path = Path(path)
    if (path / "truth").is_dir():
        path = path / "truth"
    if not visible_parquet_files(path):
        raise AnswerKeyError(f"{path}: no truth Parquet files (give `unicap synth --out DIR`'s DIR or DIR/truth)")
    return path


def caption_files(path: str | Path) -> list[Path]:
    path = Path(path)
    files = visible_parquet_files(path) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise AnswerKeyError(f"{path}: no caption Parquet files")
    return files


def load_answer_key(truth: str | Path) -> dict[str, eval_captions.Scene]:
    """key -> scene of every truth row, each checked against the captions synth writes for it."""
    scenes: dict[str, eval_captions.Scene] = {}
    for f in visible_parquet_files(truth_folder(truth)):
        rows = pq.read_table(f).to_pylist()
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


def read_captions(path: str | Path) -> tuple[list[dict], tuple[str, ...], tuple[str, ...]]:
    """Rows of every caption file, and the levels / languages the files declare (first-seen order)."""
    rows: list[dict] = []
    levels: list[str] = []
    languages: list[str] = []
    for f in caption_files(path):
        table = pq.read_table(f)
        try:
            lv, lang = caption_record.levels_languages(table.schema)
        except caption_record.SchemaError as e:
            raise AnswerKeyError(f"{f}: {e}") from None
        levels += [x for x in lv if x not in levels]
        languages += [x for x in lang if x not in languages]
        rows += table.to_pylist()
    return rows, tuple(levels), tuple(languages)


def evaluate_folder(captions: str | Path, truth: str | Path) -> dict:
    """Metrics of a caption folder against a truth folder (unicap.eval_captions.evaluate), with the goal check."""
    rows, levels, languages = read_captions(captions)
    metrics = eval_captions.evaluate(rows, load_answer_key(truth), levels, languages)
    metrics["goal"] = eval_captions.goal_check(metrics)
    metrics["captions"], metrics["truth"] = str(captions), str(truth_folder(truth))
    models = sorted({str(r.get("model")) for r in rows})
    metrics["models"] = models
    return metrics


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--captions", required=True, help="caption Parquet folder (or file) to score")
    p.add_argument("--truth", required=True, help="the synthetic set: `unicap synth --out DIR`'s DIR or DIR/truth")
    p.add_argument("--out", default=None, help="metrics JSON (default: CAPTIONS/_eval.json)")


def run(args: argparse.Namespace) -> int:
    try:
        metrics = evaluate_folder(args.captions, args.truth)
    except AnswerKeyError as e:
        print(f"error: {e}")
        return 2
    captions = Path(args.captions)
    out = Path(args.out) if args.out else (captions if captions.is_dir() else captions.parent) / "_eval.json"
    write_json(metrics, out)
    print(eval_captions.format_table(metrics))
    goal = metrics["goal"]
    verdict = "met" if goal["met"] else f"not met ({len(goal['misses'])} misses, e.g. {goal['misses'][0]})"
    print(f"goal (ok >= 95%, recall of colour/shape/background >= 0.9, hallucination <= 5%): {verdict}")
    print(f"metrics: {out}")
    return 0
