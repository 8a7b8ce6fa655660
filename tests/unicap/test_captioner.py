"""The captioner's retry and status logic, on a scripted stand-in engine.

`ScriptedEngine` is a mock, named so: it stands in for vLLM only to unit-test what the captioner does
with answers (retries, statuses, error reasons). The real engines run in tests/pipelines/test_caption.py.
"""

import io
import json

from PIL import Image

from unicap import prompts
from unicap.captioner import CaptionConfig, Captioner, fit_max_pixels
from unicap.contract import caption as caption_record
from unicap.engines import GenResult

GOOD = {
    "en": "A red square on a plain white background.",
    "zh": "白色背景上的一个红色正方形。",
}


def png(size=(96, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 20, 20)).save(buf, "PNG")
    return buf.getvalue()


class ScriptedEngine:
    """Mock engine: answers every request with `reply(column, attempt)`; records the requests it got."""

    name = "scripted"
    model_name = "scripted-vlm"

    def __init__(self, cfg: CaptionConfig, reply):
        ps = prompts.prompts_for(cfg.strategy, cfg.levels, cfg.languages, cfg.max_tokens)
        self.fields_of = {p.instruction: p.fields for p in ps}
        self.reply = reply
        self.calls: list[list] = []

    def generate(self, requests):
        self.calls.append(requests)
        attempt = len(self.calls) - 1
        return [self.reply(self.fields_of[r.messages[1]["content"][1]["text"]], attempt) for r in requests]


def good(fields, attempt) -> GenResult:
    (col,) = fields
    return GenResult(GOOD[caption_record.parse_caption_column(col)[1]], "stop", 7)


def caption(cfg: CaptionConfig, reply, items=None):
    engine = ScriptedEngine(cfg, reply)
    items = items or [{"key": "k0", "shard": "00000", "image": png(), "source": "x.png", "sha256": "ab"}]
    rows = Captioner(engine, cfg).caption(items)
    # every row keeps the contract
    caption_record.validate(caption_record.to_table(rows, cfg.levels, cfg.languages))
    return rows, engine


def test_all_captions_pass_first_time():
    cfg = CaptionConfig(levels=("short", "tags"), languages=("en", "zh"))
    (row,), engine = caption(cfg, good)
    assert row["status"] == "ok" and row["error"] is None
    assert row["caption_short_zh"] == GOOD["zh"]
    # tags are normalised: no full stop
    assert row["caption_tags_en"] == "A red square on a plain white background"
    assert row["num_output_tokens"] == 4 * 7 and (row["width"], row["height"]) == (96, 64)
    provenance = (row["engine"], row["model"], row["prompt_version"])
    assert provenance == ("scripted", "scripted-vlm", prompts.PROMPT_VERSION)
    assert len(engine.calls) == 1 and all(r.temperature == 0.0 for r in engine.calls[0])  # greedy first


def test_failed_captions_are_retried_alone_with_sampling():
    cfg = CaptionConfig(levels=("short",), languages=("en", "zh"), max_retries=2, retry_temperature=0.7)

    def reply(fields, attempt):  # the Chinese caption comes back in English once, then right
        if fields == ("caption_short_zh",) and attempt == 0:
            return GenResult(GOOD["en"], "stop", 5)
        return good(fields, attempt)

    (row,), engine = caption(cfg, reply)
    assert row["status"] == "ok" and row["caption_short_zh"] == GOOD["zh"]
    assert [len(c) for c in engine.calls] == [2, 1]  # only the failed caption is asked again
    assert engine.calls[1][0].temperature == 0.7
    assert row["num_output_tokens"] == 7 + 5 + 7  # every attempt's tokens count


def test_retries_run_out_partial_then_failed():
    cfg = CaptionConfig(levels=("long", "short"), languages=("en",), max_retries=1)

    def loop_on_long(fields, attempt):
        if fields == ("caption_long_en",):
            return GenResult("the cat " * 10, "stop", 20)
        return good(fields, attempt)

    (row,), engine = caption(cfg, loop_on_long)
    assert row["status"] == "partial" and row["caption_long_en"] is None and row["caption_short_en"]
    assert row["error"].startswith("repetition_loop: caption_long_en: ")
    assert len(engine.calls) == 2  # the first try and one retry

    def nothing(fields, attempt):
        return GenResult("" if fields == ("caption_long_en",) else "a cat", "length", 9)

    (row,), _ = caption(cfg, nothing)
    assert row["status"] == "failed" and caption_record.error_reason(row["error"]) == "empty_output"
    # every column's reason, in column order
    assert row["error"].split("; ")[1].startswith("truncated: caption_short_en")


def test_engine_errors_and_undecodable_images_are_failed_rows():
    cfg = CaptionConfig(levels=("short",), languages=("en",), max_retries=1)
    (row,), engine = caption(cfg, lambda f, a: GenResult(None, None, 0, "timeout: no answer within 180s"))
    assert row["status"] == "failed" and row["error"] == "timeout: caption_short_en: no answer within 180s"
    assert len(engine.calls) == 2

    items = [
        {"key": "bad", "shard": "00000", "image": b"not an image"},
        {"key": "ok", "shard": "00000", "image": png()},
    ]
    rows, engine = caption(cfg, good, items)
    assert rows[0]["status"] == "failed" and rows[0]["error"].startswith("undecodable_image: not_an_image")
    assert rows[0]["width"] is None and rows[1]["status"] == "ok"
    assert [len(c) for c in engine.calls] == [1]  # nothing is sent for an image that does not decode


def test_json_strategy_parse_truncation_and_malformed_answers():
    cfg = CaptionConfig(levels=("short",), languages=("en", "zh"), strategy="json", max_retries=0)
    answer = json.dumps({"short_en": GOOD["en"], "short_zh": GOOD["zh"]})
    (row,), engine = caption(cfg, lambda f, a: GenResult(answer, "stop", 30))
    assert row["status"] == "ok" and row["caption_short_zh"] == GOOD["zh"]
    assert len(engine.calls[0]) == 1 and engine.calls[0][0].json_schema is not None  # one request per image

    (row,), _ = caption(cfg, lambda f, a: GenResult(answer[:-5], "length", 30))
    assert row["status"] == "failed" and caption_record.error_reason(row["error"]) == "truncated"
    (row,), _ = caption(cfg, lambda f, a: GenResult("{not json", "stop", 30))
    assert row["status"] == "failed" and caption_record.error_reason(row["error"]) == "malformed_output"
    half = json.dumps({"short_en": GOOD["en"], "short_zh": GOOD["en"]})  # the Chinese one in English
    (row,), _ = caption(cfg, lambda f, a: GenResult(half, "stop", 30))
    assert row["status"] == "partial" and row["error"].startswith("wrong_language: caption_short_zh")


def test_images_are_fitted_into_max_pixels():
    im = Image.new("RGB", (1000, 500))
    small = fit_max_pixels(im, 448 * 448)
    assert small.width * small.height <= 448 * 448 and abs(small.width / small.height - 2) < 0.01
    assert fit_max_pixels(Image.new("RGB", (100, 50)), 448 * 448).size == (100, 50)
    cfg = CaptionConfig(levels=("short",), languages=("en",), max_pixels=32 * 32)
    (_row,), engine = caption(cfg, good, [{"key": "k", "shard": "s", "image": png((640, 480))}])
    w, h = engine.calls[0][0].image.size
    assert w * h <= 32 * 32


def test_decode_for_model_reduces_early_and_gives_the_full_decode_s_picture():
    """decode_for_model decodes big images small (JPEG DCT scaling, box reduction) before the one bicubic
    resize: the same size as decoding at full size and resizing, nearly the same pixels, original width/height."""
    import numpy as np

    from unicap.captioner import DECODE_HEADROOM, decode_for_model
    from unicap.decode import decode_image

    yy, xx = np.mgrid[0:1536, 0:1024]
    art = np.stack([(xx * 255 // 1023), (yy * 255 // 1535), ((xx // 128 + yy // 128) % 2) * 255], -1)
    mp = 168 * 168
    for fmt in ("JPEG", "PNG"):
        buf = io.BytesIO()
        Image.fromarray(art.astype(np.uint8)).save(buf, fmt)
        early = decode_for_model(buf.getvalue(), mp)
        full = decode_image(buf.getvalue())
        assert early.ok and (early.width, early.height) == (full.width, full.height) == (1024, 1536)
        assert mp <= early.image.width * early.image.height <= DECODE_HEADROOM * mp  # reduced, never below mp
        assert full.image.width * full.image.height == 1024 * 1536
        a, b = fit_max_pixels(early.image, mp), fit_max_pixels(full.image, mp)
        assert a.size == b.size
        diff = np.abs(np.asarray(a, dtype=float) - np.asarray(b, dtype=float))
        assert diff.mean() < 3.0, (fmt, diff.mean())  # the same picture (a wrong reduction moves the squares)
    assert decode_for_model(b"not an image", mp).error.startswith("not_an_image")
