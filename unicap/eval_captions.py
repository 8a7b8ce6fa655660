"""Caption accuracy against an exact scene graph: a deterministic English / Chinese parser, no model as judge.

The synthetic set (datagen.synth) knows every image's content: a background colour, 1-2 groups of identical
shapes (size, colour, shape, count) in the cells of a 3x3 grid, an optional word along the bottom. This module
reads what a caption *says* about such a scene, over a closed vocabulary with synonyms, plural forms, numbers
in words and digits (and 两 / 二 / 2 in Chinese), and compares it with what the scene *is*.

Facts of a scene, by kind (a caption "mentions" tuples of the same shapes; None in a mention is a wildcard,
e.g. "two circles" mentions (None, "circle", 2)):

    colour      {colour}                      of every object        ("red")
    shape       {shape}                                              ("circle")
    object      {(colour, shape)}                                    CHAIR's unit: a bare shape mentions (None, shape)
    size        {(size, colour, shape)}       per group              ("small red circle")
    count       {(colour, shape, n)}          per group, and ("total", n) where the level states the total
    position    {(colour, shape, cell)}       per object, cell 0-8 row-major (0 top left, 4 center, 8 bottom right)
    background  {background}
    word        {WORD}                        the rendered word, if any

Recall (facts a caption mentions / facts) is measured for the kinds a level is asked to state (LEVEL_KINDS:
a short caption is not asked for positions); precision (mentions that are facts / mentions) for every kind a
caption mentions. Hallucination, CHAIR-style: object mentions not in the scene / object mentions (instance
rate), and the share of captions with at least one. Position phrases attach to the nearest object mention
before them in the sentence (else the next one); phrases in a clause about the written word ("along the
bottom", 底部写着单词) are not object positions.

`evaluate(rows, scenes)` gives per level x language: recall / precision per kind, hallucination, the share of
captions present and in the right language, failure reasons; plus the status mix. `format_table` prints it.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from unicap import checks
from unicap.caption_vocab import EN, EN_MARKERS, EN_NUMBERS, ZH, ZH_MARKERS, ZH_NUMBERS
from unicap.contract import caption as caption_record

KINDS = ("colour", "shape", "object", "size", "count", "position", "background", "word")
# what each level's instruction asks for (unicap.prompts): recall is measured for these kinds only
LEVEL_KINDS: dict[str, tuple[str, ...]] = {
    "long": KINDS,
    "medium": ("colour", "shape", "object", "size", "count", "background", "word"),
    "short": ("colour", "shape", "object", "count", "background"),
    "tags": ("colour", "shape", "object", "background", "word"),
}
TOTAL_LEVELS = ("long",)  # levels whose captions state the total number of shapes
CELL_NAMES = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)

_QUOTED = re.compile(r"[\"“”「『‘]([^\"“”「」『』‘’]{1,40})[\"“”」』’]")
_CAPS = re.compile(r"\b[A-Z]{2,}\b")
_SENTENCE = re.compile(r"[.!?;。！？；\n]+")
_CLAUSE = re.compile(r"[,，:：]")


def _alt(table: Mapping) -> str:
    """A regex alternation of every phrase of a vocabulary table, longest first."""
    return "|".join(sorted((p for ps in table.values() for p in ps), key=len, reverse=True))


def _canonical(table: Mapping, text: str):
    """The canonical value whose phrase `text` is (the parser matched one of them)."""
    for k, ps in table.items():
        if any(re.fullmatch(p, text) for p in ps):
            return k
    raise AssertionError(f"no canonical value for {text!r}")


def _build(vocab: dict, zh: bool) -> re.Pattern:
    col, shp, siz = _alt(vocab["colour"]), _alt(vocab["shape"]), _alt(vocab["size"])
    bg, pos = _alt(vocab["background"]), _alt(vocab["position"])
    if zh:
        num = "|".join([*ZH_NUMBERS, r"\d+"])
        parts = [
            rf"(?P<bg1>{bg})(?:的)?背景",
            rf"背景(?:是|为)?(?:纯色的|纯色|纯|一片)?(?P<bg2>{bg})",
            rf"(?P<tnum>{num})\s*(?:个|种)(?:几何)?(?:图形|形状|物体)",
            rf"(?:(?P<num>{num})\s*(?:个|只|块|枚))?(?P<size>{siz})?(?P<colour>{col})(?:的)?(?P<shape>{shp})",
            rf"(?P<bshape>{shp})",
            rf"(?P<pos>{pos})",
            rf"(?P<marker>{ZH_MARKERS})",
        ]
        return re.compile("|".join(parts))
    num = "|".join([*EN_NUMBERS, r"\d+"])
    filler = r"(?:(?:bright|solid|flat|filled|plain|vivid|light|dark|single)\s+)?"
    parts = [
        rf"\b(?P<bg1>{bg})[ -]colou?red\s+background\b|\b(?P<bg2>{bg})\s+background\b",
        rf"\bbackground\s+(?:is|of)\s+(?:a\s+)?(?:plain\s+|solid\s+)?(?P<bg3>{bg})\b",
        rf"\bon\s+(?:a\s+)?(?:plain\s+|solid\s+)?(?P<bg4>{bg})\s*$",
        rf"\b(?P<tnum>{num})\s+(?:geometric\s+|different\s+)?(?:shapes?|objects?|figures?)\b",
        rf"\b(?:(?P<num>{num})\s+)?(?:(?P<size>{siz}),?\s+)?{filler}(?P<colour>{col}),?\s+(?P<shape>{shp})\b",
        rf"\b(?P<bshape>{shp})\b",
        rf"\b(?P<pos>{pos})\b",
        rf"\b(?P<marker>{EN_MARKERS})\b",
    ]
    return re.compile("|".join(parts))


_PATTERNS = {"en": _build(EN, zh=False), "zh": _build(ZH, zh=True)}
_VOCAB = {"en": EN, "zh": ZH}


# ---------------------------------------------------------------- scenes and facts


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    cell: int  # 0..8, row-major 3x3 grid


@dataclass(frozen=True)
class Scene:
    """The answer key of one image (datagen.synth's scene graph, without pixel boxes)."""

    background: str
    text: str | None
    objects: tuple[SceneObject, ...]

    @classmethod
    def from_dict(cls, d: Mapping) -> Scene:
        objs = tuple(SceneObject(o["shape"], o["color"], o["size"], int(o["cell"])) for o in d["objects"])
        return cls(d["background"], d.get("text"), objs)

    def groups(self) -> dict[tuple[str, str, str], int]:
        """(size, colour, shape) -> number of objects."""
        return Counter((o.size, o.color, o.shape) for o in self.objects)


def facts(scene: Scene, level: str) -> dict[str, set]:
    """The scene's facts by kind; `level` decides whether the total count is one."""
    groups = scene.groups()
    count = {(c, s, n) for (_, c, s), n in groups.items()}
    if level in TOTAL_LEVELS:
        count.add(("total", len(scene.objects)))
    return {
        "colour": {o.color for o in scene.objects},
        "shape": {o.shape for o in scene.objects},
        "object": {(o.color, o.shape) for o in scene.objects},
        "size": set(groups),
        "count": count,
        "position": {(o.color, o.shape, o.cell) for o in scene.objects},
        "background": {scene.background},
        "word": {scene.text.upper()} if scene.text else set(),
    }


# ---------------------------------------------------------------- parsing


def parse(text: str, language: str) -> dict[str, set]:
    """What a caption mentions, by kind (see the module docstring). `language`: "en" or "zh"
    (other languages are parsed with the English rules)."""
    lang = "zh" if language == "zh" else "en"
    vocab, pattern = _VOCAB[lang], _PATTERNS[lang]
    out: dict[str, set] = {k: set() for k in KINDS}
    out["word"] |= {q.strip().upper() for q in _QUOTED.findall(text) if q.strip()}
    body = _QUOTED.sub(" \u2063 ", text)  # quoted words are not colours or shapes ("RED")
    out["word"] |= set(_CAPS.findall(body))
    body = body if lang == "zh" else body.lower().replace("-", " ")
    for sentence in _SENTENCE.split(body):
        _parse_sentence(sentence, vocab, pattern, out)
    return out


def _number(text: str | None) -> int | None:
    if text is None:
        return None
    return int(text) if text.isdigit() else EN_NUMBERS.get(text, ZH_NUMBERS.get(text))


def _parse_sentence(sentence: str, vocab: dict, pattern: re.Pattern, out: dict[str, set]) -> None:
    clause_starts = [0] + [m.end() for m in _CLAUSE.finditer(sentence)]
    marked = set()  # clauses about the written word
    events: list[tuple[str, object]] = []  # ("object", (colour, shape)) | ("pos", cell), in order
    for m in pattern.finditer(sentence):
        g = {k: v for k, v in m.groupdict().items() if v is not None}
        clause = sum(1 for s in clause_starts if s <= m.start()) - 1
        bg = next((g[k] for k in ("bg1", "bg2", "bg3", "bg4") if k in g), None)
        if bg is not None:
            out["background"].add(_canonical(vocab["background"], bg))
        elif "tnum" in g:
            n = _number(g["tnum"])
            if n is not None:
                out["count"].add(("total", n))
        elif "colour" in g or "bshape" in g:
            colour = _canonical(vocab["colour"], g["colour"]) if "colour" in g else None
            shape = _canonical(vocab["shape"], g.get("shape") or g["bshape"])
            out["object"].add((colour, shape))
            out["shape"].add(shape)
            if colour is not None:
                out["colour"].add(colour)
            if "size" in g:
                out["size"].add((_canonical(vocab["size"], g["size"]), colour, shape))
            n = _number(g.get("num"))
            if n is not None:
                out["count"].add((colour, shape, n))
            events.append(("object", (colour, shape)))
        elif "pos" in g:
            events.append(("pos", (clause, _canonical(vocab["position"], g["pos"]))))
        elif "marker" in g:
            marked.add(clause)
    objects = [i for i, (kind, _) in enumerate(events) if kind == "object"]
    for i, (kind, value) in enumerate(events):
        if kind != "pos" or value[0] in marked:
            continue
        before = [j for j in objects if j < i]
        after = [j for j in objects if j > i]
        owner = events[before[-1]][1] if before else events[after[0]][1] if after else (None, None)
        out["position"].add((*owner, value[1]))


# ---------------------------------------------------------------- scoring


def _match(mention: tuple | str, fact: tuple | str) -> bool:
    if not isinstance(mention, tuple):
        return mention == fact
    return len(mention) == len(fact) and all(m is None or m == f for m, f in zip(mention, fact, strict=True))


@dataclass
class CaptionScore:
    """Per kind: facts recalled / facts, mentions that are facts / mentions; object hallucinations."""

    recalled: dict[str, int] = field(default_factory=dict)
    facts: dict[str, int] = field(default_factory=dict)
    correct: dict[str, int] = field(default_factory=dict)
    mentions: dict[str, int] = field(default_factory=dict)
    objects_mentioned: int = 0
    objects_hallucinated: int = 0


def score_caption(text: str, language: str, scene: Scene, level: str) -> CaptionScore:
    said, truth = parse(text, language), facts(scene, level)
    out = CaptionScore()
    for kind in KINDS:
        out.correct[kind] = sum(any(_match(m, f) for f in truth[kind]) for m in said[kind])
        out.mentions[kind] = len(said[kind])
        if kind in LEVEL_KINDS.get(level, KINDS):
            out.recalled[kind] = sum(any(_match(m, f) for m in said[kind]) for f in truth[kind])
            out.facts[kind] = len(truth[kind])
    out.objects_mentioned = out.mentions["object"]
    out.objects_hallucinated = out.mentions["object"] - out.correct["object"]
    return out


def _column_failures(error: str | None) -> dict[str, str]:
    """The captioner's `error` ("reason: caption_long_zh: detail; ...") -> {column: reason}."""
    out = {}
    for part in (error or "").split("; "):
        bits = [b.strip() for b in part.split(":", 2)]
        if len(bits) >= 2 and bits[1].startswith("caption_"):
            out[bits[1]] = bits[0]
    return out


def _ratio(a: int, b: int) -> float | None:
    return a / b if b else None


def evaluate(
    rows: Iterable[Mapping],
    scenes: Mapping[str, Scene],
    levels: Sequence[str] = caption_record.LEVELS,
    languages: Sequence[str] = caption_record.LANGUAGES,
) -> dict:
    """Metrics of caption rows (caption records) against the scenes of their keys.

    Rows whose key has no scene are counted (`rows_without_truth`) and skipped; keys with a scene and no row
    are `missing`. Recall and hallucination are over the captions present."""
    rows = list(rows)
    scored = [r for r in rows if r["key"] in scenes]
    seen = {r["key"] for r in scored}
    out: dict = {
        "rows": len(scored),
        "rows_without_truth": len(rows) - len(scored),
        "missing": len(set(scenes) - seen),
        "status": dict(Counter(r.get("status") for r in scored)),
        "columns": {},
    }
    out["ok_share"] = _ratio(out["status"].get("ok", 0), len(scored))
    for level in levels:
        for lang in languages:
            col = caption_record.caption_column(level, lang)
            asked = LEVEL_KINDS.get(level, KINDS)  # the kinds this level's captions are recalled on
            total = CaptionScore(
                recalled=dict.fromkeys(asked, 0),
                facts=dict.fromkeys(asked, 0),
                correct=dict.fromkeys(KINDS, 0),
                mentions=dict.fromkeys(KINDS, 0),
            )
            present = right_lang = wrong_lang_failed = with_hallucination = 0
            reasons: Counter = Counter()
            for r in scored:
                text = r.get(col)
                failure = _column_failures(r.get("error")).get(col)
                if failure:
                    reasons[failure] += 1
                    wrong_lang_failed += failure == "wrong_language"
                if not (isinstance(text, str) and text.strip()):
                    continue
                present += 1
                right_lang += checks.wrong_language(text, lang) is None
                s = score_caption(text, lang, scenes[r["key"]], level)
                for kind in total.recalled:
                    total.recalled[kind] += s.recalled[kind]
                    total.facts[kind] += s.facts[kind]
                for kind in KINDS:
                    total.correct[kind] += s.correct[kind]
                    total.mentions[kind] += s.mentions[kind]
                with_hallucination += s.objects_hallucinated > 0
            kinds = {
                k: {
                    "recall": _ratio(total.recalled[k], total.facts[k]) if k in total.recalled else None,
                    "precision": _ratio(total.correct[k], total.mentions[k]),
                    "facts": total.facts.get(k, 0),
                    "recalled": total.recalled.get(k, 0),
                    "mentions": total.mentions[k],
                    "correct": total.correct[k],
                }
                for k in KINDS
            }
            hallucinated = total.mentions["object"] - total.correct["object"]
            out["columns"][col] = {
                "level": level,
                "language": lang,
                "present": present,
                "present_share": _ratio(present, len(scored)),
                "right_language": _ratio(right_lang, present + wrong_lang_failed),
                "failures": dict(reasons),
                "kinds": kinds,
                "hallucination": {
                    "objects_mentioned": total.mentions["object"],
                    "objects_hallucinated": hallucinated,
                    "instance_rate": _ratio(hallucinated, total.mentions["object"]),
                    "caption_rate": _ratio(with_hallucination, present),
                },
            }
    return out


# ---------------------------------------------------------------- the goal and the table

GOAL = {
    "ok_share": 0.95,
    "recall": 0.90,
    "recall_kinds": ("colour", "shape", "background"),
    "hallucination": 0.05,
}


def goal_check(metrics: dict, goal: Mapping = GOAL) -> dict:
    """The issue's bar: ok on >= 95% of rows; >= 90% recall of colour, shape and background in every
    column; object hallucination (instance rate) <= 5% in every column. Missing numbers fail."""
    misses = []
    if (metrics.get("ok_share") or 0.0) < goal["ok_share"]:
        misses.append(f"ok share {metrics.get('ok_share') or 0:.3f} < {goal['ok_share']}")
    for col, m in metrics["columns"].items():
        for kind in goal["recall_kinds"]:
            r = m["kinds"][kind]["recall"]
            if r is None or r < goal["recall"]:
                misses.append(f"{col} {kind} recall {_fmt(r)} < {goal['recall']}")
        h = m["hallucination"]["instance_rate"]
        if h is None or h > goal["hallucination"]:
            misses.append(f"{col} hallucination {_fmt(h)} > {goal['hallucination']}")
    goal_json = {k: list(v) if isinstance(v, tuple) else v for k, v in goal.items()}
    return {"met": not misses, "misses": misses, "goal": goal_json}


def _fmt(v: float | None) -> str:
    return "  -  " if v is None else f"{v:5.3f}"


def format_table(metrics: dict) -> str:
    """Recall per kind (precision of objects beside it), hallucination, presence and language per column."""
    short = {"position": "pos", "background": "bg"}
    head = [
        "column",
        "present",
        "lang",
        *[f"R {short.get(k, k)}" for k in KINDS],
        "P object",
        "CHAIR_i",
        "CHAIR_s",
    ]
    widths = [17, 7, 5, *[8] * len(KINDS), 8, 7, 7]
    lines = [" ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(head, widths, strict=True)))]
    for col, m in metrics["columns"].items():
        cells = [col.removeprefix("caption_"), _fmt(m["present_share"]), _fmt(m["right_language"])]
        cells += [_fmt(m["kinds"][k]["recall"]) for k in KINDS]
        chair = m["hallucination"]
        cells += [_fmt(m["kinds"]["object"]["precision"]), _fmt(chair["instance_rate"]), _fmt(chair["caption_rate"])]
        lines.append(
            " ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
        )
    status = ", ".join(f"{k} {v}" for k, v in sorted(metrics["status"].items(), key=lambda kv: str(kv[0])))
    lines.append(
        f"rows {metrics['rows']} (status: {status}; ok share {_fmt(metrics['ok_share']).strip()}), "
        f"missing {metrics['missing']}, without truth {metrics['rows_without_truth']}"
    )
    lines.append(
        "R: recall over the captions present ('-': the level is not asked for it); P: precision; "
        "CHAIR_i: object mentions not in the image / object mentions; CHAIR_s: captions with one or more"
    )
    return "\n".join(lines)
