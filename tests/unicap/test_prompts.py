"""Prompt building: one request per level x language (direct) or one JSON request (json), image first."""

import json

import pytest

from unicap import prompts
from unicap.contract.caption import caption_columns


def test_direct_prompts_one_per_level_and_language():
    ps = prompts.direct_prompts(["long", "tags"], ["en", "zh"], {"tags": 50})
    assert [p.name for p in ps] == ["long_en", "long_zh", "tags_en", "tags_zh"]
    assert [p.fields for p in ps] == [(c,) for c in caption_columns(["long", "tags"], ["en", "zh"])]
    assert [p.max_tokens for p in ps] == [prompts.DEFAULT_MAX_TOKENS["long"]] * 2 + [50, 50]
    assert all(p.json_schema is None for p in ps)
    assert "Answer in English only" in ps[0].instruction and "Simplified Chinese" in ps[1].instruction
    assert ps[2].instruction.startswith(prompts.LEVEL_INSTRUCTIONS["tags"])


def test_json_prompt_asks_for_every_caption_in_one_object():
    p = prompts.json_prompt(["short", "tags"], ["en", "zh"])
    keys = ["short_en", "short_zh", "tags_en", "tags_zh"]
    assert p.json_schema["required"] == keys and p.json_schema["additionalProperties"] is False
    assert p.fields == tuple(caption_columns(["short", "tags"], ["en", "zh"]))
    tokens = prompts.DEFAULT_MAX_TOKENS
    # every answer plus JSON overhead
    assert p.max_tokens == 2 * tokens["short"] + 2 * tokens["tags"] + 16 * 4
    assert all(f'"{k}"' in p.instruction for k in keys)


def test_strategies_and_unknown_names_are_clear_errors():
    assert len(prompts.prompts_for("direct", ["long"], ["en", "zh"])) == 2
    assert len(prompts.prompts_for("json", ["long"], ["en", "zh"])) == 1
    with pytest.raises(ValueError, match="unknown strategy 'fancy'"):
        prompts.prompts_for("fancy", ["long"], ["en"])
    with pytest.raises(ValueError, match="unknown level 'poem'"):
        prompts.direct_prompts(["poem"], ["en"])
    with pytest.raises(ValueError, match="unknown level 'poem'"):
        prompts.json_prompt(["poem"], ["en"])
    with pytest.raises(ValueError, match="unknown language 'xx'"):
        prompts.direct_prompts(["long"], ["xx"])


def test_messages_put_the_image_first_so_an_images_requests_share_a_prefix():
    msgs = [
        prompts.chat_messages(p, "data:image/png;base64,AAAA")
        for p in prompts.direct_prompts(["long", "short"], ["en"])
    ]
    for m in msgs:
        assert m[0] == {"role": "system", "content": prompts.SYSTEM_PROMPT}
        assert m[1]["role"] == "user" and m[1]["content"][0]["type"] == "image_url"
        assert m[1]["content"][1]["type"] == "text"
    # everything up to the instruction is identical: vLLM's prefix cache encodes the image once
    assert msgs[0][0] == msgs[1][0] and msgs[0][1]["content"][0] == msgs[1][1]["content"][0]


def test_parse_json_captions():
    p = prompts.json_prompt(["short"], ["en", "zh"])
    out = prompts.parse_json_captions(json.dumps({"short_en": "A red square.", "short_zh": 3}), p)
    assert out == {"caption_short_en": "A red square.", "caption_short_zh": None}  # not text: no caption
    assert prompts.parse_json_captions("{}", p) == {"caption_short_en": None, "caption_short_zh": None}
    with pytest.raises(ValueError, match="not JSON"):
        prompts.parse_json_captions('{"short_en": "A red', p)
    with pytest.raises(ValueError, match="not an object"):
        prompts.parse_json_captions('["A red square."]', p)
