"""The Accuracy section: captions scored against the synthetic answer key (unicap.eval_captions), for the
held-out captions and the pool's, and for stage3's rows of the pool's."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

from unicap import eval_captions, storage
from unicap.contract import shards as shard_contract
from unicap.report.images import read_tar_members
from unicap.report.markup import Section, badge, esc, level_class, pct, section_head, status_chips
from unicap.report.run_folder import (
    RunFolder,
    by_shard,
    caption_levels_languages,
    empty_section,
    how_to,
    parquet_files,
    read_json,
)
from unicap.storage import Location

# ---------------------------------------------------------------- collect


def truth_paths(path: str | os.PathLike | Location) -> tuple[Location, Location]:
    """A synthetic set (`unicap synth --out DIR`'s DIR, a path or a URI) or its truth/ -> (truth Parquet
    folder, shard folder)."""
    loc = storage.resolve(path)
    if loc.join("truth").is_dir():
        return loc.join("truth"), loc
    return loc, loc.parent


def load_scenes(truth: str | os.PathLike | Location) -> dict[str, eval_captions.Scene]:
    """key -> scene graph of every truth row, read from the shards' {key}.json (datagen.synth writes each
    image's scene graph there; `unicap eval-captions` regenerates the same graph from the row's source)."""
    truth_dir, shard_dir = truth_paths(truth)
    files = parquet_files(truth_dir)
    if not files:
        raise ValueError(f"{truth}: no truth Parquet files (give `unicap synth --out DIR`'s DIR or DIR/truth)")
    keys = by_shard((r["key"], r["shard"]) for f in files for r in f.read_parquet(columns=["key", "shard"]).to_pylist())
    scenes: dict[str, eval_captions.Scene] = {}
    for shard, shard_keys in keys.items():
        tar = shard_dir.join(shard_contract.tar_path("", shard).name)
        for key, (_, data) in read_tar_members(tar, set(shard_keys), ("json",)).items():
            meta = json.loads(data)
            if isinstance(meta, dict) and "objects" in meta and "background" in meta:
                scenes[key] = eval_captions.Scene.from_dict(meta)
    n = sum(len(k) for k in keys.values())
    if len(scenes) < n:
        raise ValueError(
            f"{shard_dir}: {n - len(scenes)} of {n} truth rows have no scene graph in their shard's "
            "{key}.json: give the synthetic set's folder (its shards beside truth/)"
        )
    return scenes


def _keys(files: list[Location]) -> set[str]:
    return {k for f in files for k in f.read_parquet(columns=["key"]).column("key").to_pylist()}


def _evaluate(files: list[Location], scenes: Mapping[str, eval_captions.Scene], keys: set[str] | None = None) -> dict:
    """unicap.eval_captions.evaluate + goal_check of caption files (only the rows of `keys` when given), as
    `unicap eval-captions` reports them."""
    levels, languages = caption_levels_languages(files)
    rows = [r for f in files for r in f.read_parquet().to_pylist() if keys is None or r["key"] in keys]
    metrics = eval_captions.evaluate(rows, scenes, levels, languages)
    metrics["goal"] = eval_captions.goal_check(metrics)
    metrics["models"] = sorted({str(r.get("model")) for r in rows})
    return metrics


def _table(title: str, source: str, metrics: dict | None) -> dict:
    return {"title": title, "source": source, "metrics": metrics}


def _stage_tables(
    run: RunFolder, files: list[Location], scenes: Mapping[str, eval_captions.Scene], source: str
) -> list:
    """stage3's rows of the pool's captions scored alone: do the CLIP filters keep captions that are right?"""
    stage3 = run.manifest("stage3")
    if not stage3.is_file():
        return []
    title = "stage3's captions (the same captions, the rows the filters kept)"
    return [_table(title, f"{source}, rows of {stage3}", _evaluate(files, scenes, _keys([stage3])))]


def evaluate_against_answer_key(captions: str | os.PathLike | Location, truth: str | os.PathLike | Location) -> dict:
    """The metrics `unicap eval-captions --captions CAPTIONS --truth TRUTH` writes."""
    files = parquet_files(storage.resolve(captions))
    if not files:
        raise ValueError(f"{captions}: no caption Parquet files")
    metrics = _evaluate(files, load_scenes(truth))
    metrics["captions"], metrics["truth"] = str(captions), truth_paths(truth)[0].uri
    return metrics


def collect_accuracy(run: RunFolder, truths: list[str | os.PathLike | Location]) -> dict:
    """Caption accuracy against the synthetic answer key, for the held-out captions and the pool's.

    With --truth (one or more answer keys), every caption folder of the run whose keys are in one is scored
    here; otherwise a folder's `_eval.json` (what `unicap eval-captions` wrote) is shown, and the held-out
    set is scored here when it has captions and truth but no _eval.json."""
    sec = empty_section(tables=[])
    answer_keys = {str(t): load_scenes(t) for t in truths}
    folders = (
        ("held-out synthetic set", run.heldout_captions, run.heldout),
        ("this run's captions", run.captions, run.data),
    )
    for title, captions, own_truth in folders:
        pool = captions.uri == run.captions.uri
        files = parquet_files(captions)
        evaluated = captions.join("_eval.json")
        if files and answer_keys:
            keys = _keys(files)
            matching = [t for t, scenes in answer_keys.items() if keys & scenes.keys()]
            if matching:
                scenes = {k: v for t in matching for k, v in answer_keys[t].items()}
                source = f"{captions} against --truth {', '.join(matching)}"
                sec["tables"].append(_table(title, source, _evaluate(files, scenes)))
                if pool:  # the filters' effect: the last stage's captions against the pool's
                    sec["tables"] += _stage_tables(run, files, scenes, source)
                continue
            hint = f" (`--truth {own_truth}` scores it)" if own_truth.join("truth").is_dir() else ""
            sec["notes"].append(f"{captions}: none of its keys is in the answer key given with --truth{hint}")
        if evaluated.is_file():
            sec["tables"].append(_table(title, str(evaluated), read_json(evaluated)))
        elif files and not pool and run.heldout_truth.is_dir():
            source = f"{captions} against {run.heldout} (computed here: no _eval.json)"
            sec["tables"].append(_table(title, source, evaluate_against_answer_key(captions, run.heldout)))
        elif files and pool and run.truth.is_dir() and not answer_keys:
            sec["notes"].append(
                f"this pool is synthetic ({run.truth} exists): add `--truth {run.data}` to score "
                "its captions against the answer key too"
            )
    if not any(t["title"] == folders[0][0] for t in sec["tables"]):
        scored = f"held-out captions scored against the answer key ({run.heldout_captions.join('_eval.json')})"
        sec["missing"].append((scored, how_to(run)["heldout"]))
    return sec


# ---------------------------------------------------------------- render

METRICS_HEAD = ["caption", "present", "right lang."]
LEGEND = (
    '<p class="legend">Recall: facts of the image a caption states / facts (– : the level is not asked '
    "for that kind); precision: mentions that are true / mentions; CHAIR<sub>i</sub>: object mentions not "
    "in the image / object mentions; CHAIR<sub>s</sub>: captions with at least one. Goal: ok on ≥ 95% of "
    "rows, recall of colour, shape and background ≥ 0.9, CHAIR<sub>i</sub> ≤ 0.05 "
    "(<code>unicap/eval_captions.py</code>).</p>"
)


def accuracy_table(m: Mapping) -> str:
    """unicap.eval_captions' metrics as a table: recall per kind, precision of objects, hallucination."""
    kinds = eval_captions.KINDS
    recalls = [f"recall<br>{esc(k)}" for k in kinds]
    head = [*METRICS_HEAD, *recalls, "precision<br>object", "CHAIR<sub>i</sub>", "CHAIR<sub>s</sub>"]
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
            hallucination = i >= len(kinds) + 1  # CHAIR: lower is better
            good, mid = (0.05, 0.3) if hallucination else (0.9, 0.6)
            cls = level_class(v, good=good, mid=mid, higher_is_better=not hallucination)
            tds.append(f'<td class="num {cls}">{"–" if v is None else f"{v:.2f}"}</td>')
        body += "<tr>" + "".join(tds) + "</tr>"
    return f'<div class="scroll"><table>{body}</tbody></table></div>'


def _goal(t: Mapping) -> str:
    """One scored caption folder: its heading with the goal's verdict, what was read, the table, the misses."""
    m = t.get("metrics") or {}
    status = status_chips(sorted((m.get("status") or {}).items(), key=str))
    goal = m.get("goal") or {}
    verdict = badge("goal met", "ok") if goal.get("met") else badge("goal not met", "failed") if goal else ""
    models = ", ".join(m.get("models") or [])
    out = f"<h3>{esc(t['title'])} {verdict}</h3>"
    out += (
        f'<p class="legend">{esc(m.get("rows"))} rows ({status}), missing {esc(m.get("missing"))}, without '
        f"truth {esc(m.get('rows_without_truth'))}; models {esc(models)}; source <code>{esc(t['source'])}</code></p>"
    )
    out += accuracy_table(m)
    misses = goal.get("misses") or []
    if misses:
        shown = "".join(f"<li>{esc(x)}</li>" for x in misses[:6])
        more = f"<li>… and {len(misses) - 6} more</li>" if len(misses) > 6 else ""
        summary = f"<summary>why the goal is not met ({len(misses)})</summary>"
        out += f"<details>{summary}<ul>{shown}{more}</ul></details>"
    return out


def body(r: Mapping) -> str:
    sec = r["accuracy"]
    out = section_head(sec) + "".join(_goal(t) for t in sec.get("tables") or [])
    return out + LEGEND if sec.get("tables") else out


LEAD = (
    "The synthetic images' content is known exactly, so every caption can be checked: what it gets right, "
    "what it misses, what it invents."
)
SECTION = Section("accuracy", "Accuracy", "Caption accuracy against the answer key", LEAD, body)
