"""Hostile server answers and engine failures: each is the failure of one request (or one item), never
the batch's exception; the server-mode timeout is a deadline for the whole request.

The server is tests/pipelines/standin_server.py (a STAND-IN: no real model misbehaves on cue); the HTTP
client, retries and parsing are real. `ScriptedEngine` (tests/unicap/test_captioner.py) is a mock engine.
"""

from __future__ import annotations

import json
import time

import pytest
from PIL import Image

from tests.pipelines.standin_server import BEHAVIOURS, StandInServer
from tests.unicap.test_captioner import ScriptedEngine, good, png
from unicap import prompts
from unicap.captioner import CaptionConfig, Captioner
from unicap.contract import caption as caption_record
from unicap.engines import EngineConfig, GenRequest, GenResult, ServerEngine, parse_chat_answer

COLOUR = {b: c for c, b in BEHAVIOURS.items()}


def _answer(content, **extra) -> bytes:
    return json.dumps({"choices": [{"message": {"content": content}, "finish_reason": "stop"}], **extra}).encode()


@pytest.mark.parametrize(
    "raw",
    [
        _answer(None),
        _answer(["a", "list"]),
        _answer(42),
        _answer({"text": "x"}),
        _answer(True),
        b"",
        b"null",
        b"[]",
        b"{}",
        b'{"choices": []}',
        b'{"choices": [null]}',
        b'{"choices": [{"message": "hi"}]}',
        b'{"choices": "x"}',
        b"[" * 100_000 + b"]" * 100_000,
        _answer("\ud800"),
        b"\xff\xfe",
    ],
)
def test_unusable_answers_are_malformed_output(raw):
    r = parse_chat_answer(raw)
    assert r.text is None and caption_record.error_reason(r.error) == "malformed_output", r.error


def test_usable_answers_and_odd_token_counts():
    assert parse_chat_answer(_answer("a caption", usage={"completion_tokens": 9})) == GenResult("a caption", "stop", 9)
    for usage in (
        {"completion_tokens": "9"},
        {"completion_tokens": -3},
        {"completion_tokens": True},
        [],
        None,
    ):
        assert parse_chat_answer(_answer("x", usage=usage)).num_tokens == 0
    assert parse_chat_answer(_answer("x", usage={"completion_tokens": 10**20})).num_tokens == 2**31 - 1


def _image(behaviour: str) -> Image.Image:
    return Image.new("RGB", (32, 32), COLOUR[behaviour])


def _request(behaviour: str) -> GenRequest:
    p = prompts.direct_prompts(["short"], ["en"])[0]
    return GenRequest(prompts.chat_messages(p, "placeholder"), _image(behaviour), max_tokens=16)


def test_server_answers_that_are_not_text_fail_their_request_only():
    kinds = [
        "good",
        "null_content",
        "list_content",
        "number_content",
        "surrogate",
        "empty_body",
        "huge",
        "malformed",
    ]
    with StandInServer() as standin:
        engine = ServerEngine(EngineConfig(model="standin-vlm", server=standin.url, timeout_s=10, http_retries=0))
        results = engine.generate([_request(k) for k in kinds])
    assert results[0].error is None and "square" in results[0].text
    for kind, r in zip(kinds[1:], results[1:], strict=True):
        assert r.text is None and caption_record.error_reason(r.error) == "malformed_output", (kind, r.error)
    assert "over 4194304 bytes" in results[kinds.index("huge")].error


def test_timeout_is_a_deadline_for_the_whole_request_not_per_read():
    with StandInServer(trickle_s=0.2) as standin:  # ~70 s for the whole answer, a byte every 0.2 s
        cfg = EngineConfig(model="standin-vlm", server=standin.url, timeout_s=1.0, http_retries=1)
        t0 = time.monotonic()
        results = ServerEngine(cfg).generate([_request("trickle"), _request("good")])
        took = time.monotonic() - t0
    assert results[0].error.startswith("timeout: no complete answer within 1s"), results[0].error
    assert results[1].error is None
    assert took < 8, took  # two attempts of 1 s plus one backoff (<= 1.5 s), not minutes


def test_unreachable_server_and_bad_engine_settings():
    results = ServerEngine(EngineConfig(model="m", server="http://127.0.0.1:9", timeout_s=2)).generate(
        [_request("good")]
    )
    assert results[0].error.startswith("engine_error: server unreachable")
    for kwargs, message in [
        ({"timeout_s": 0}, "--timeout"),
        ({"timeout_s": float("nan")}, "--timeout"),
        ({"max_concurrent": 0}, "--max-concurrent-requests"),
        ({"http_retries": -1}, "--http-retries"),
        ({"server": "file:///etc/passwd"}, "--server"),
        ({"server": "127.0.0.1:8000"}, "--server"),
        ({"max_pixels": 0}, "--max-pixels"),
    ]:
        with pytest.raises(ValueError, match=message):
            EngineConfig(**kwargs)


CFG = CaptionConfig(levels=("short",), languages=("en",), max_retries=1)


def _items(n: int) -> list[dict]:
    return [{"key": f"k{i}", "shard": "00000", "image": png()} for i in range(n)]


def _check(rows: list[dict], n: int) -> None:
    assert [r["key"] for r in rows] == [f"k{i}" for i in range(n)]
    caption_record.validate(caption_record.to_table(rows, CFG.levels, CFG.languages))


@pytest.mark.parametrize(
    "reply, reason",
    [
        (lambda fields, attempt: 1 / 0, "engine_error"),  # the engine raises
        (lambda fields, attempt: GenResult(["not", "text"], "stop", 3), "malformed_output"),
        (lambda fields, attempt: GenResult(12345, "stop", 3), "malformed_output"),
        (lambda fields, attempt: GenResult(None, None, 0), "empty_output"),
    ],
)
def test_engine_failures_become_the_items_rows(reply, reason):
    engine = ScriptedEngine(CFG, reply)
    rows = Captioner(engine, CFG).caption(_items(3))
    _check(rows, 3)
    assert {r["status"] for r in rows} == {"failed"}
    assert {caption_record.error_reason(r["error"]) for r in rows} == {reason}


def test_short_answer_lists_and_odd_items_do_not_kill_the_batch():
    class Short(ScriptedEngine):
        def generate(self, requests):
            return super().generate(requests)[:-1]  # one result missing

    rows = Captioner(Short(CFG, good), CFG).caption(_items(2))
    _check(rows, 2)
    assert {caption_record.error_reason(r["error"]) for r in rows} == {"engine_error"}
    items = _items(3)
    items[1]["image"] = None  # no bytes (a failed read upstream)
    items[2]["image"] = b"\x89PNG\r\n\x1a\n" + b"\0" * 40
    rows = Captioner(ScriptedEngine(CFG, good), CFG).caption(items)
    _check(rows, 3)
    assert [r["status"] for r in rows] == ["ok", "failed", "failed"]
    assert rows[1]["error"].startswith("undecodable_image: empty_file")


def test_a_row_is_ok_only_with_every_caption():
    cfg = CaptionConfig(levels=("short",), languages=("en",))
    object.__setattr__(cfg, "max_retries", -1)  # past the config's own check: no attempt is made at all
    rows = Captioner(ScriptedEngine(cfg, good), cfg).caption(_items(2))
    assert {r["status"] for r in rows} == {"failed"} and all(r["caption_short_en"] is None for r in rows)
    assert {caption_record.error_reason(r["error"]) for r in rows} == {"engine_error"}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_retries": -1}, "--max-retries"),
        ({"levels": ()}, "--levels is empty"),
        ({"languages": ()}, "--languages"),
        ({"levels": ("poem",)}, "unknown level 'poem'"),
        ({"languages": ("xx",)}, "unknown language 'xx'"),
        ({"levels": ("long", "long")}, "names one twice"),
        ({"max_tokens": {"long": 0}}, "max-tokens long"),
        ({"retry_temperature": -1.0}, "--retry-temperature"),
        ({"strategy": "fancy"}, "unknown strategy"),
    ],
)
def test_bad_caption_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CaptionConfig(**kwargs)
