"""Versioned caption prompts, in the spirit of UniCap (Lumina-Image 2.0, section 3).

Every request puts the image FIRST and the instruction after it, so all requests for one image
share one prefix (system prompt + image tokens): vLLM's prefix cache and encoder cache then
encode the image once per image, not once per level x language.

Strategies (see bench/bench_caption_strategies.py for the measured comparison):
- "direct": one request per (level, language), image + instruction; each caption is validated
  and retried on its own.
- "json":   one request per image returning every level x language as one JSON object, guided
  by a JSON schema (vLLM structured outputs).
Bump PROMPT_VERSION whenever a template's wording changes: it is written into every row.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from unicap.contract.caption import caption_column, parse_caption_column

PROMPT_VERSION = "unicap-v1"
SYSTEM_PROMPT = "You are an expert image captioner. You describe exactly what is visible, without speculation."

LEVEL_INSTRUCTIONS = {
    "long": (
        "Write a detailed description of this image in one paragraph of 150 to 250 words. Cover, in order: the "
        "overall style and medium (photo, illustration, render...); the main subject with its attributes "
        "(colour, size, shape, material, pose, expression); every other object with its attributes and count; "
        "the spatial relations between them (left, right, above, behind...); the background and lighting; "
        "and any visible text, quoted exactly."
    ),
    "medium": (
        "Describe this image in two or three sentences (40 to 70 words): the style, the main subject and its "
        "most important attributes, the other key objects, and any visible text, quoted exactly."
    ),
    "short": "Describe this image in one short sentence of at most 20 words: the main subject and the scene.",
    "tags": (
        "List 8 to 20 tags for this image as one comma-separated line: subjects, objects, attributes, colours, "
        "style, setting. No numbering, no sentences."
    ),
}
LANGUAGE_NAMES = {
    "en": "English",
    "zh": "Simplified Chinese",
    "ja": "Japanese",
    "ko": "Korean",
    "de": "German",
    "fr": "French",
    "es": "Spanish",
    "ru": "Russian",
}
DEFAULT_MAX_TOKENS = {"long": 512, "medium": 160, "short": 64, "tags": 128}


@dataclass(frozen=True)
class Prompt:
    """One request to the VLM: chat messages (image placeholder first), and what it produces."""

    name: str  # "long_en" for direct; "json" for the structured strategy
    instruction: str
    max_tokens: int
    json_schema: dict | None = None
    fields: tuple[str, ...] = ()  # caption columns this request fills


def language_name(language: str) -> str:
    try:
        return LANGUAGE_NAMES[language]
    except KeyError:
        raise ValueError(f"unknown language {language!r}; known: {sorted(LANGUAGE_NAMES)}") from None


def check_levels(levels: Sequence[str]) -> Sequence[str]:
    """The levels, if every one has an instruction; else a ValueError naming the unknown one."""
    for level in levels:
        if level not in LEVEL_INSTRUCTIONS:
            raise ValueError(f"unknown level {level!r}; known: {sorted(LEVEL_INSTRUCTIONS)}")
    return levels


def json_key(level: str, language: str) -> str:
    """The structured strategy's JSON key for a caption ("long_en")."""
    return f"{level}_{language}"


def direct_prompts(
    levels: Sequence[str], languages: Sequence[str], max_tokens: dict[str, int] | None = None
) -> list[Prompt]:
    max_tokens = {**DEFAULT_MAX_TOKENS, **(max_tokens or {})}
    out = []
    for level in check_levels(levels):
        for lang in languages:
            text = f"{LEVEL_INSTRUCTIONS[level]} Answer in {language_name(lang)} only, with no preamble."
            out.append(Prompt(f"{level}_{lang}", text, max_tokens[level], fields=(caption_column(level, lang),)))
    return out


def json_prompt(levels: Sequence[str], languages: Sequence[str], max_tokens: dict[str, int] | None = None) -> Prompt:
    max_tokens = {**DEFAULT_MAX_TOKENS, **(max_tokens or {})}
    check_levels(levels)
    keys = [json_key(lv, lang) for lv in levels for lang in languages]
    schema = {
        "type": "object",
        "properties": {k: {"type": "string"} for k in keys},
        "required": keys,
        "additionalProperties": False,
    }
    parts = [
        f'"{json_key(lv, lang)}": {LEVEL_INSTRUCTIONS[lv]} Written in {language_name(lang)}.'
        for lv in levels
        for lang in languages
    ]
    header = "Caption this image at several levels of detail. Return one JSON object with these keys:\n"
    text = header + "\n".join(parts)
    budget = sum(max_tokens[lv] for lv in levels for _ in languages) + 16 * len(keys)
    fields = tuple(caption_column(lv, lang) for lv in levels for lang in languages)
    return Prompt("json", text, budget, json_schema=schema, fields=fields)


def prompts_for(
    strategy: str, levels: Sequence[str], languages: Sequence[str], max_tokens: dict[str, int] | None = None
) -> list[Prompt]:
    if strategy == "direct":
        return direct_prompts(levels, languages, max_tokens)
    if strategy == "json":
        return [json_prompt(levels, languages, max_tokens)]
    raise ValueError(f"unknown strategy {strategy!r}: use 'direct' or 'json'")


def chat_messages(prompt: Prompt, image_url: str) -> list[dict]:
    """OpenAI-style chat messages; the same list goes to vLLM offline (LLM.chat) and to the server."""
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": image_url}},
                {"type": "text", "text": prompt.instruction},
            ],
        },
    ]


def parse_json_captions(text: str, prompt: Prompt) -> dict[str, str]:
    """The structured strategy's answer -> {caption column: text}; raises ValueError if malformed."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e.msg} at {e.pos})") from None
    if not isinstance(obj, dict):
        raise ValueError("JSON is not an object")
    out = {}
    for col in prompt.fields:
        v = obj.get(json_key(*parse_caption_column(col)))
        out[col] = v if isinstance(v, str) else None
    return out
