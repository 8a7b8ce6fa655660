"""Image decoding, once for every job: raw bytes -> RGB image, or a recorded failure with a reason.

Handled: EXIF orientation; CMYK/YCCK; palette and alpha (composited on white); 16-bit and
32-bit greyscale (scaled, not clipped); greyscale; WebP; animated GIF/PNG/WebP (first frame).
Refused with a reason: zero bytes (`empty_file`), bytes no decoder knows (`not_an_image`),
cut-off files (`truncated`), more pixels than the limit (`too_many_pixels`, checked from the header
before any pixel is decoded), anything else the codec rejects (`corrupt`).
Flagged but kept: `tiny` (short side under `min_side`), `extreme_aspect`, `animated`.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Our own check runs first; Pillow's global bomb guard stays as a second line of defence.
DEFAULT_MAX_PIXELS = 64_000_000  # 8000 x 8000
DEFAULT_MIN_SIDE = 64
DEFAULT_MAX_ASPECT = 4.0

DECODE_REASONS = ("empty_file", "not_an_image", "truncated", "too_many_pixels", "corrupt")


@dataclass
class Decoded:
    """The outcome of decoding one image: `image` (RGB) or `error` ("<reason>: <detail>")."""

    image: Image.Image | None
    error: str | None = None
    width: int | None = None  # after EXIF orientation
    height: int | None = None
    format: str | None = None
    flags: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.image is not None

    @property
    def reason(self) -> str | None:
        return None if self.error is None else self.error.split(":", 1)[0]


def _fail(reason: str, detail: str, fmt: str | None = None, size=(None, None)) -> Decoded:
    return Decoded(None, f"{reason}: {detail}", size[0], size[1], fmt)


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB; transparency composited onto white."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") else max(float(a.max()), 1.0)
        lo = 0.0 if im.mode.startswith("I;16") else min(float(a.min()), 0.0)
        a = np.clip((a - lo) / (hi - lo) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        im = Image.fromarray(a, mode="L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif im.mode in ("L", "1") and "transparency" in im.info:
        im = im.convert("LA")
    elif im.mode == "RGB" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    if im.mode != "RGB":
        return im.convert("RGB")  # CMYK, YCbCr, LAB, L, 1 ...
    return im


def _reason_of(e: Exception) -> str:
    msg = str(e).lower()
    if isinstance(e, OSError | EOFError | SyntaxError) and any(
        m in msg for m in ("truncated", "broken data stream", "premature end", "unexpected end")
    ):
        return "truncated"
    return "corrupt"


def decode_image(
    data: bytes | bytearray | memoryview | None,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = DEFAULT_MIN_SIDE,
    max_aspect: float = DEFAULT_MAX_ASPECT,
) -> Decoded:
    """Decode `data` into an RGB image; never raises for bad bytes, returns a Decoded with `error`."""
    if not data:
        return _fail("empty_file", "zero bytes")
    try:
        im = Image.open(io.BytesIO(bytes(data)))
    except UnidentifiedImageError:
        return _fail("not_an_image", "no image decoder recognises these bytes")
    except Image.DecompressionBombError as e:
        return _fail("too_many_pixels", str(e))
    except Exception as e:  # noqa: BLE001 - a broken header can raise anything
        return _fail(_reason_of(e), f"{type(e).__name__}: {e}")
    fmt = im.format
    w, h = im.size
    if w <= 0 or h <= 0:
        return _fail("corrupt", f"header says {w}x{h}", fmt)
    if w * h > max_pixels:
        return _fail("too_many_pixels", f"{w}x{h} = {w * h} pixels > limit {max_pixels}", fmt, (w, h))
    flags: list[str] = []
    try:
        if getattr(im, "is_animated", False) and getattr(im, "n_frames", 1) > 1:
            flags.append("animated")
            im.seek(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow warns on odd EXIF / palette details
            im.load()
            im = ImageOps.exif_transpose(im) or im
            rgb = _to_rgb(im)
    except Image.DecompressionBombError as e:
        return _fail("too_many_pixels", str(e), fmt, (w, h))
    except Exception as e:  # noqa: BLE001 - codec errors are data here, not crashes
        return _fail(_reason_of(e), f"{type(e).__name__}: {e}", fmt, (w, h))
    w, h = rgb.size
    if min(w, h) < min_side:
        flags.append("tiny")
    if max(w, h) / min(w, h) > max_aspect:
        flags.append("extreme_aspect")
    return Decoded(rgb, None, w, h, fmt, flags)

