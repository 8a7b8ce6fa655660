"""The captioner: decoded images -> caption-record rows, on any engine (vLLM offline or server).

For each image: decode once (unicap.decode), fit into `max_pixels`, send the strategy's prompts,
validate every caption (unicap.checks), retry the failed ones up to `max_retries` times with
sampling on (temperature `retry_temperature`), then write one row:
`ok` when every level x language passed, `partial` when some did, `failed` when none did or the
image could not be decoded; `error` holds the reasons.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Literal

from PIL import Image

from unicap import checks, preflight, prompts
from unicap.contract import caption as caption_record
from unicap.decode import Decoded, decode_image
from unicap.engines import MAX_PIXELS, MAX_TOKENS_COUNT, GenRequest, GenResult


@dataclass
class CaptionConfig:
    levels: tuple[str, ...] = caption_record.LEVELS
    languages: tuple[str, ...] = caption_record.LANGUAGES
    strategy: Literal["direct", "json"] = "direct"
    max_retries: int = 2
    retry_temperature: float = 0.7
    max_pixels: int = MAX_PIXELS  # keep equal to the engine's (EngineConfig.max_pixels)
    max_tokens: dict[str, int] = field(default_factory=dict)  # per level, over prompts.DEFAULT_MAX_TOKENS

    def __post_init__(self) -> None:
        self.levels, self.languages = tuple(self.levels), tuple(self.languages)
        for name, values in (("levels", self.levels), ("languages", self.languages)):
            if not values:
                raise preflight.UsageError(f"--{name} is empty: give at least one")
            if len(set(values)) != len(values):
                raise preflight.UsageError(f"--{name} {','.join(values)} names one twice")
        caption_record.caption_schema(self.levels, self.languages)  # names usable as columns, else ValueError
        preflight.at_least("max_retries", self.max_retries, 0)
        preflight.at_least("retry_temperature", self.retry_temperature, 0)
        preflight.above("max_pixels", self.max_pixels, 0)
        unknown = set(self.max_tokens) - set(prompts.LEVEL_INSTRUCTIONS)
        if unknown:
            raise ValueError(
                f"max_tokens for unknown level(s) {sorted(unknown)}; known: {sorted(prompts.LEVEL_INSTRUCTIONS)}"
            )
        for level, n in self.max_tokens.items():
            preflight.at_least(f"max_tokens {level}", n, 1)
        prompts.prompts_for(self.strategy, self.levels, self.languages, self.max_tokens)  # unknown level/language


# decoding reduces an image to at most this many times the pixels the model sees (JPEG DCT scaling, integer box
# reduction: cheap), and fit_max_pixels's one bicubic resize does the rest. Decoding at full size and resizing
# once cost 6 ms per 1024x1536 image on this machine's cores, taken from the engine's; this 2.9 ms, with the
# same size and a mean pixel difference of 0.05 / 255 (bench/bench_caption_vs_engine.py measures the job).
DECODE_HEADROOM = 4


def decode_for_model(data: bytes, max_pixels: int) -> Decoded:
    """Decode `data` (never raises; see unicap.decode.decode_image) for a model that sees at most `max_pixels`:
    the image comes out at most DECODE_HEADROOM x max_pixels, never below; width/height stay the original's.
    The caption job and the captioner trainer both decode through here, so a model trains on what it sees."""
    return decode_image(data, max_output_pixels=DECODE_HEADROOM * max_pixels)


def fit_max_pixels(image: Image.Image, max_pixels: int) -> Image.Image:
    """Downscale (aspect kept) so width*height <= max_pixels; smaller images are left as they are."""
    w, h = image.size
    if w * h <= max_pixels:
        return image
    s = (max_pixels / (w * h)) ** 0.5
    return image.resize((max(1, int(w * s)), max(1, int(h * s))), Image.Resampling.BICUBIC)


class Captioner:
    def __init__(self, engine, cfg: CaptionConfig):
        self.engine = engine
        self.cfg = cfg
        self.prompts = prompts.prompts_for(cfg.strategy, cfg.levels, cfg.languages, cfg.max_tokens)
        self.columns = caption_record.caption_columns(cfg.levels, cfg.languages)
        # one engine call at a time: callers may caption batches on several threads (the caption job's actor
        # does, so that one batch's decoding overlaps the engine's work on another); vLLM is not thread-safe
        self._engine_lock = threading.Lock()

    def caption(self, items: list[dict]) -> list[dict]:
        """items: dicts with key, shard, image (bytes) and optional source, original_caption, sha256.

        One row per item, always: whatever goes wrong with one item (its image, the engine's answer
        to one of its requests) is that item's error, never the batch's exception."""
        n = len(items)
        decoded = [self._decode(it) for it in items]
        images = [None] * n
        for i, d in enumerate(decoded):
            if d.ok:
                try:
                    images[i] = fit_max_pixels(d.image, self.cfg.max_pixels)
                except Exception as e:  # noqa: BLE001
                    decoded[i] = _Undecodable(f"corrupt: {type(e).__name__}: {e}"[:300], d.width, d.height)
        captions: list[dict[str, str]] = [{} for _ in range(n)]
        errors: list[dict[str, str]] = [{} for _ in range(n)]
        tokens = [0] * n
        pending = [(i, p) for i in range(n) if images[i] is not None for p in self.prompts]
        for attempt in range(self.cfg.max_retries + 1):
            if not pending:
                break
            reqs = [
                GenRequest(
                    messages=prompts.chat_messages(p, "placeholder"),
                    image=images[i],
                    max_tokens=p.max_tokens,
                    # greedy first (identical in both engine modes); retries sample. No per-request
                    # seed: vLLM's CPU backend rejects seeded sampling ("CPU Generator does not use offset")
                    temperature=0.0 if attempt == 0 else self.cfg.retry_temperature,
                    json_schema=p.json_schema,
                )
                for i, p in pending
            ]
            results = self._generate(reqs)
            still = []
            for (i, p), res in zip(pending, results, strict=True):
                tokens[i] += _token_count(res)
                for col, (text, err) in self._judge_safely(p, res).items():
                    if err is None:
                        captions[i][col] = text
                        errors[i].pop(col, None)
                    else:
                        errors[i][col] = err
                if any(col in errors[i] for col in p.fields):
                    still.append((i, p))
            pending = still
        return [self._row(items[i], decoded[i], captions[i], errors[i], tokens[i]) for i in range(n)]

    def _decode(self, item: dict):
        data = item.get("image")
        if not isinstance(data, bytes | bytearray | memoryview):
            return _Undecodable("empty_file: no image bytes")
        try:
            return decode_for_model(bytes(data), self.cfg.max_pixels)
        except Exception as e:  # noqa: BLE001 - the decoder's own failure is this image's
            return _Undecodable(f"corrupt: {type(e).__name__}: {e}"[:300])

    def _generate(self, reqs: list[GenRequest]) -> list:
        """The engine's results, one per request; an engine exception or a short answer list becomes
        engine_error results."""
        try:
            with self._engine_lock:
                results = list(self.engine.generate(reqs))
            if len(results) == len(reqs):
                return results
            why = f"{len(results)} results for {len(reqs)} requests"
        except Exception as e:  # noqa: BLE001
            why = f"{type(e).__name__}: {e}"
        return [GenResult(None, None, 0, f"engine_error: {why}"[:300]) for _ in reqs]

    def _judge_safely(self, p: prompts.Prompt, res) -> dict[str, tuple[str | None, str | None]]:
        try:
            if res.text is not None and not isinstance(res.text, str):
                raise TypeError(f"engine returned {type(res.text).__name__}, not text")
            return self._judge(p, res)
        except Exception as e:  # noqa: BLE001
            return dict.fromkeys(p.fields, (None, f"malformed_output: {type(e).__name__}: {e}"[:300]))

    def _judge(self, p: prompts.Prompt, res) -> dict[str, tuple[str | None, str | None]]:
        """Per caption column of this prompt: (cleaned text, None) if accepted, else (None, error)."""
        if res.error:
            return dict.fromkeys(p.fields, (None, res.error))
        if p.json_schema is None:
            texts, finish = {p.fields[0]: res.text}, res.finish_reason
        elif res.finish_reason == "length":
            return dict.fromkeys(
                p.fields, (None, "truncated: structured answer hit the token limit (finish_reason=length)")
            )
        else:
            try:
                texts, finish = prompts.parse_json_captions(res.text or "", p), "stop"
            except ValueError as e:
                return dict.fromkeys(p.fields, (None, f"malformed_output: {e}"))
        out = {}
        for col, text in texts.items():
            level, lang = caption_record.parse_caption_column(col)
            err = checks.check_caption(text, level, lang, finish)
            out[col] = (checks.clean_caption(text, level), None) if err is None else (None, err)
        return out

    def _row(self, item: dict, decoded, caps: dict[str, str], errs: dict[str, str], tokens: int) -> dict:
        row = {
            "key": item["key"],
            "shard": item["shard"],
            "sha256": item.get("sha256"),
            "width": decoded.width,
            "height": decoded.height,
            "source": item.get("source"),
            "original_caption": item.get("original_caption"),
            "model": getattr(self.engine, "model_name", None),
            "prompt_version": prompts.PROMPT_VERSION,
            "engine": getattr(self.engine, "name", type(self.engine).__name__),
            "num_output_tokens": tokens,
            "created_at": caption_record.utcnow(),
        }
        for col in self.columns:
            row[col] = caps.get(col)
        errs = dict(errs)
        for col in self.columns:  # no caption and no recorded failure: never "ok" by omission
            if col not in caps and col not in errs:
                errs[col] = "engine_error: no answer was received for this caption"
        row["num_output_tokens"] = min(tokens, MAX_TOKENS_COUNT)
        if not decoded.ok:
            row.update(status="failed", error=f"undecodable_image: {decoded.error}")
        elif not errs:
            row.update(status="ok", error=None)
        else:
            ordered = [
                f"{caption_record.error_reason(e)}: {col}: {_detail(e)}"
                for col, e in sorted(errs.items(), key=lambda kv: self.columns.index(kv[0]))
            ]
            row.update(status="partial" if caps else "failed", error="; ".join(ordered)[:2000])
        return row


@dataclass
class _Undecodable:
    """A decode outcome for an item the decoder could not even be asked about (no bytes, a crash)."""

    error: str
    width: int | None = None
    height: int | None = None
    ok: bool = False
    image: None = None


def _token_count(res) -> int:
    n = getattr(res, "num_tokens", 0)
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 0


def _detail(err: str) -> str:
    return err.split(":", 1)[1].strip() if ":" in err else ""
