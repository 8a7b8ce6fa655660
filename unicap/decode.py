"""Image decoding, once for every job: raw bytes -> RGB image, or a recorded failure with a reason.

Handled: EXIF orientation; CMYK/YCCK; palette and alpha (composited on white); 16-bit and
32-bit greyscale (scaled, not clipped); greyscale; WebP; animated GIF/PNG/WebP (first frame).
Refused with a reason: zero bytes (`empty_file`), bytes no decoder knows (`not_an_image`),
cut-off files and pixel data that ends before the image does (`truncated`: a PNG whose complete
zlib stream holds fewer rows than its header declares decodes "fine" in Pillow, the missing rows
black), more pixels than the limit (`too_many_pixels`, checked from the header before any pixel is
decoded), anything else the codec rejects (`corrupt`).
Flagged but kept: `tiny` (short side under `min_side`), `extreme_aspect`, `animated`.

Memory within limits. An image declaring up to `max_pixels` is decoded, but what comes back holds at
most `max_output_pixels`: JPEGs are decoded at a reduced scale directly (libjpeg DCT scaling,
Pillow's `draft`), other formats are reduced (`Image.reduce`, an integer box filter) right after
decoding, before any mode conversion. `width`/`height` stay the original's (after orientation).
So a batch of B decoded images holds at most B x max_output_pixels x 3 bytes
(16 x 2048 x 2048 x 3 = 201 MB at the defaults), plus one image's transient decode (at most
max_pixels x 4 bytes, 256 MB, for a non-JPEG near the limit; a JPEG's is its reduced size).
"""

from __future__ import annotations

import io
import math
import struct
import warnings
import zlib
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Our own check runs first; Pillow's global bomb guard stays as a second line of defence.
DEFAULT_MAX_PIXELS = 64_000_000  # 8000 x 8000: declared sizes above it are refused
DEFAULT_MAX_OUTPUT_PIXELS = 2048 * 2048  # delivered images are reduced to this (VLM, CLIP, buckets need less)
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


# ---------------------------------------------------------------- PNG pixel data that ends early

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel
ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
DEFLATE_MAX_RATIO = 1032  # deflate cannot expand more than this (258-byte matches in ~2 bits)


def _png_raw_size(width: int, height: int, bit_depth: int, colour_type: int, interlace: int) -> int:
    """Bytes of filtered scanlines a complete PNG of this header inflates to (one filter byte per row)."""
    bits = PNG_CHANNELS.get(colour_type, 4) * bit_depth
    passes = ADAM7 if interlace else ((0, 0, 1, 1),)
    total = 0
    for x0, y0, dx, dy in passes:
        cols, rows = -(-(width - x0) // dx), -(-(height - y0) // dy)
        if cols > 0 and rows > 0:
            total += rows * (1 + -(-cols * bits // 8))
    return total


def png_pixel_data_short(data: bytes) -> str | None:
    """Why a PNG's pixel data ends before its image does, or None (complete, or not ours to judge).

    Pillow stops at the end of the zlib stream and returns the missing rows as zeros, without error;
    this inflates the IDAT chunks (in bounded pieces, counting, never holding the pixels) and
    compares with what the header declares. A stream too small to ever hold the image (a 100-byte
    file declaring 64M pixels) is refused without inflating."""
    if not data.startswith(PNG_SIGNATURE):
        return None
    view, pos, header, idat = memoryview(data), len(PNG_SIGNATURE), None, []
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", view[pos : pos + 8])
        body = view[pos + 8 : pos + 8 + length]
        if kind == b"IHDR" and len(body) >= 13:
            header = struct.unpack(">IIBBBBB", body[:13])
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        pos += 12 + length
    if header is None:
        return None
    width, height, bit_depth, colour_type, _, _, interlace = header
    need = _png_raw_size(width, height, bit_depth, colour_type, interlace)
    compressed = sum(len(b) for b in idat)
    if need > DEFLATE_MAX_RATIO * compressed + 1024:
        return f"{compressed} bytes of pixel data cannot hold the {width}x{height} image it declares ({need} bytes)"
    inflater, got = zlib.decompressobj(), 0
    try:
        for body in idat:
            chunk = bytes(body)
            while chunk and got < need:
                got += len(inflater.decompress(chunk, 1 << 20))
                chunk = inflater.unconsumed_tail
            if got >= need or inflater.eof:
                break
    except zlib.error:
        return None  # a broken stream: Pillow reports it (corrupt)
    if got < need:
        return f"pixel data ends after {got} of {need} bytes ({width}x{height})"
    return None


# ---------------------------------------------------------------- decoding

REDUCIBLE_MODES = ("L", "LA", "La", "RGB", "RGBA", "RGBa", "I", "F", "CMYK", "YCbCr")  # Image.reduce works on these


def _reduction(width: int, height: int, max_output_pixels: int) -> int:
    """The integer factor that brings width x height down to max_output_pixels (1: no reduction)."""
    if width * height <= max_output_pixels:
        return 1
    return math.ceil(math.sqrt(width * height / max_output_pixels))


def decode_image(
    data: bytes | bytearray | memoryview | None,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_output_pixels: int = DEFAULT_MAX_OUTPUT_PIXELS,
    min_side: int = DEFAULT_MIN_SIDE,
    max_aspect: float = DEFAULT_MAX_ASPECT,
) -> Decoded:
    """Decode `data` into an RGB image of at most `max_output_pixels` (reduced, aspect kept);
    never raises for bad bytes, returns a Decoded with `error`. width/height are the original's."""
    if not data:
        return _fail("empty_file", "zero bytes")
    data = bytes(data)
    try:
        im = Image.open(io.BytesIO(data))
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
    if fmt == "PNG" and (short := png_pixel_data_short(data)):
        return _fail("truncated", short, fmt, (w, h))
    flags: list[str] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow warns on odd EXIF / palette details
            if getattr(im, "is_animated", False) and getattr(im, "n_frames", 1) > 1:
                flags.append("animated")
                im.seek(0)
            factor = _reduction(w, h, max_output_pixels)
            if factor > 1 and fmt == "JPEG":
                im.draft(im.mode, (-(-w // factor), -(-h // factor)))  # DCT scaling: decodes at 1/2..1/8
            im.load()
            factor = _reduction(*im.size, max_output_pixels)
            if factor > 1 and im.mode in REDUCIBLE_MODES:
                im = im.reduce(factor)  # before any conversion: the copies below are of the small image
            stored = im.size
            im = ImageOps.exif_transpose(im) or im
            rgb = _to_rgb(im)
            if (factor := _reduction(*rgb.size, max_output_pixels)) > 1:
                rgb = rgb.reduce(factor)  # palette, 1-bit and 16-bit images: reduced once in RGB
    except Image.DecompressionBombError as e:
        return _fail("too_many_pixels", str(e), fmt, (w, h))
    except Exception as e:  # noqa: BLE001 - codec errors are data here, not crashes
        return _fail(_reason_of(e), f"{type(e).__name__}: {e}", fmt, (w, h))
    if im.size != stored:  # EXIF orientation turned it a quarter
        w, h = h, w
    if min(w, h) < min_side:
        flags.append("tiny")
    if max(w, h) / min(w, h) > max_aspect:
        flags.append("extreme_aspect")
    return Decoded(rgb, None, w, h, fmt, flags)
