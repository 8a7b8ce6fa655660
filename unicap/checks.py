"""Validation of every caption a model writes: returns None (keep) or "<reason>: <detail>".

Reasons (unicap.contract.caption.ERROR_REASONS): empty_output, truncated (finish reason "length"), refusal,
repetition_loop, wrong_language (a Chinese caption without CJK text, an English one with it).
Tags are normalised to one comma-separated line.
"""

from __future__ import annotations

import re

CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
KANA = re.compile(r"[\u3040-\u30ff]")
HANGUL = re.compile(r"[\uac00-\ud7af]")
LETTER = re.compile(r"[^\W\d_]", re.UNICODE)
REFUSAL = re.compile(
    r"^\s*(i'?m sorry|i am sorry|sorry,|i can(?:no|')t|i am unable|i'm unable|as an ai|i do not see|"
    r"抱歉|对不起|我无法|我不能|无法提供)",
    re.IGNORECASE,
)
TAG_SPLIT = re.compile(r"\s*[,，、;；\n]\s*")


def _script_share(text: str, pattern: re.Pattern) -> float:
    letters = LETTER.findall(text)
    return len(pattern.findall(text)) / max(len(letters), 1)


def wrong_language(text: str, language: str) -> str | None:
    """None if `text` is plausibly in `language`, else a detail string."""
    cjk = _script_share(text, CJK)
    if language == "zh":
        return None if cjk >= 0.3 else f"Chinese caption with {cjk:.0%} CJK characters"
    if language == "ja":
        return None if _script_share(text, KANA) + cjk >= 0.3 else "Japanese caption without kana/kanji"
    if language == "ko":
        return None if _script_share(text, HANGUL) >= 0.3 else "Korean caption without Hangul"
    # Latin-script and other languages: CJK text means the model answered in the wrong language
    return None if CJK.search(text) is None else f"{language} caption contains CJK text ({cjk:.0%})"


def _units(text: str) -> list[str]:
    """Words for spaced scripts, characters for CJK-heavy text."""
    return list(text.replace(" ", "")) if _script_share(text, CJK) > 0.3 else text.split()


def repetition(text: str, min_repeats: int = 4, max_ngram: int = 12) -> str | None:
    """Detect degenerate loops: an n-gram repeated back to back `min_repeats`+ times (8+ for n=1)."""
    units = _units(text)
    for n in range(1, max_ngram + 1):
        need = 8 if n == 1 else min_repeats  # single words repeat legitimately more often
        if n * need > len(units):
            break
        for phase in range(n):  # a loop need not start at a multiple of n
            run = 1
            for i in range(phase + n, len(units) - n + 1, n):
                if units[i : i + n] == units[i - n : i]:
                    run += 1
                    if run >= need:
                        return f"{' '.join(units[i : i + n])[:40]!r} repeated {run}+ times"
                else:
                    run = 1
    return None


def normalise_tags(text: str) -> str:
    seen, tags = set(), []
    for t in TAG_SPLIT.split(text.strip().strip(".。")):
        t = t.strip().strip("-*#\"'").strip()
        if t and t.lower() not in seen:
            seen.add(t.lower())
            tags.append(t)
    return ", ".join(tags)


def check_caption(text: str | None, level: str, language: str, finish_reason: str | None = "stop") -> str | None:
    """None when the caption is usable, else "<reason>: <detail>"."""
    if text is None or not text.strip():
        return "empty_output: the model returned no text"
    if finish_reason == "length":
        return "truncated: generation hit the token limit (finish_reason=length)"
    if REFUSAL.search(text):
        return f"refusal: {text.strip()[:60]!r}"
    if loop := repetition(text):
        return f"repetition_loop: {loop}"
    if lang := wrong_language(text, language):
        return f"wrong_language: {lang}"
    if level == "tags" and not normalise_tags(text):
        return "empty_output: no tags after normalisation"
    return None


def clean_caption(text: str, level: str) -> str:
    text = text.strip()
    return normalise_tags(text) if level == "tags" else text
