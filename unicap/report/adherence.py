"""The Adherence section: does the trained model draw what the prompt asks? One table of attribute
accuracy per weights and examples beside their truth images, for every adherence folder of the run."""

from __future__ import annotations

import posixpath
from collections.abc import Mapping
from pathlib import Path

from unicap.report.images import image_uri
from unicap.report.markup import Section, badge, esc, level_class, section_head, thumb
from unicap.report.run_folder import THUMB_SIDE, RunFolder, empty_section, how_to, read_json
from unicap.storage import Location

# ---------------------------------------------------------------- collect


def inside(folder: Location, rel) -> Location | None:
    """The file `rel` names inside `folder`; None when `rel` is not a relative path that stays inside it
    (on a local disk, symbolic links followed) or names no file."""
    if not isinstance(rel, str) or not rel or rel.startswith(("/", "\\")) or "://" in rel:
        return None
    rel = posixpath.normpath(rel.replace("\\", "/"))
    if rel == ".." or rel.startswith("../"):
        return None
    loc = folder.join(rel)
    if folder.is_local and not Path(loc.path).resolve().is_relative_to(Path(folder.path).resolve()):
        return None
    return loc if loc.is_file() else None


def _adherence_examples(folder: Location, data: dict) -> list[dict]:
    """The examples of one adherence.json with their images inlined (paths that leave the folder are not
    read)."""

    def inline(rel) -> str | None:
        loc = inside(folder, rel)
        return image_uri(loc.read_bytes(), THUMB_SIDE) if loc is not None else None

    examples = [ex for ex in data.get("examples") or [] if isinstance(ex, dict)]
    return [{**ex, "image_uri": inline(ex.get("image")), "truth_uri": inline(ex.get("truth_image"))} for ex in examples]


def collect_adherence(run: RunFolder) -> dict:
    """adherence/adherence.json and every adherence_*/adherence.json beside it (other prompt languages or
    levels: the demo's adherence_zh/), one entry each in "runs": attribute accuracy per weights, the facts
    behind it, examples with their images."""
    sec = empty_section(runs=[])
    beside = [run.root.join(name) for name in run.root.listdir() if name.startswith("adherence_")]
    extra = [folder for folder in beside if folder.join("adherence.json").is_file()]
    for folder in [run.adherence, *extra]:
        data = read_json(folder.join("adherence.json"))
        if data is None:
            sec["missing"].append((str(folder.join("adherence.json")), how_to(run)["adherence"]))
            continue
        sec["runs"].append({"folder": folder.name, "data": data, "examples": _adherence_examples(folder, data)})
    return sec


# ---------------------------------------------------------------- render

CELL_LEGEND = "A cell: the share of images whose attribute the checker found as the prompt says (n: facts checked)."


def _accuracy_cell(v, n) -> str:
    """An attribute's accuracy, coloured by level, with the number of facts checked under it."""
    accuracy = v if isinstance(v, int | float) else None
    shown = "–" if accuracy is None else f"{v:.2f}"
    nn = f'<br><span class="legend">n={esc(n)}</span>' if n is not None else ""
    return f'<td class="num {level_class(accuracy)}">{shown}{nn}</td>'


def _verdict(attribute: str, v) -> str:
    if not isinstance(v, bool):
        return badge(f"– {attribute}", "neutral")
    return badge(f"{'✓' if v else '✗'} {attribute}", "ok" if v else "failed")


def _example(ex: Mapping) -> str:
    """One example: its prompt, the answer key's image beside the generated one, a badge per attribute."""
    verdicts = ex.get("verdicts") if isinstance(ex.get("verdicts"), dict) else {}
    chips = " ".join(_verdict(a, v) for a, v in verdicts.items())
    pair = ""
    for label, uri in (("answer key", ex.get("truth_uri")), (str(ex.get("weights", "")), ex.get("image_uri"))):
        pair += f"<figure>{thumb(uri, label, 'image missing')}<figcaption>{esc(label)}</figcaption></figure>"
    prompt = f'<div class="cap">{esc(ex.get("prompt"))}</div>'
    return f'<div class="item" style="display:block">{prompt}<div class="pair">{pair}</div>{chips}</div>'


def _adherence_run(run: Mapping) -> str:
    """One adherence.json: its accuracy table and its examples beside their truth images."""
    data = run["data"]
    attrs = [str(a) for a in data.get("attributes") or []]
    facts = data.get("facts") or {}
    p = data.get("prompts") or {}
    size = "×".join(map(str, data.get("size") or []))
    out = (
        f'<p class="legend">{esc(p.get("n"))} prompts, level {esc(p.get("level"))}, language '
        f"{esc(p.get('language'))}, from {esc(p.get('truth'))}; images {esc(size)} px. {CELL_LEGEND}</p>"
    )
    head = "<thead><tr><th>weights</th>" + "".join(f'<th class="num">{esc(a)}</th>' for a in attrs) + "</tr></thead>"
    rows = ""
    for name, accs in (data.get("rows") or {}).items():
        accs = accs if isinstance(accs, dict) else {}
        checked = facts.get(name) if isinstance(facts.get(name), dict) else {}
        cells = "".join(_accuracy_cell(accs.get(a), checked.get(a)) for a in attrs)
        rows += f"<tr><th>{esc(name)}</th>{cells}</tr>"
    out += f'<div class="scroll"><table>{head}<tbody>{rows}</tbody></table></div>'
    cards = [_example(ex) for ex in run.get("examples") or []]
    if cards:
        out += f'<h3>Examples</h3><div class="adh">{"".join(cards)}</div>'
    return out


def body(r: Mapping) -> str:
    sec = r["adherence"]
    out = section_head(sec)
    runs = sec.get("runs") or []
    for run in runs:
        if len(runs) > 1:
            p = run["data"].get("prompts") or {}
            out += f"<h3>{esc(run['folder'])}/ · {esc(p.get('level'))} {esc(p.get('language'))} prompts</h3>"
        out += _adherence_run(run)
    return out


LEAD = (
    "Does the trained model draw what the prompt asks? Prompts are the synthetic set's captions, "
    "so every attribute can be checked on the generated image."
)
SECTION = Section("adherence", "Adherence", "Prompt adherence", LEAD, body)
