"""Hostile images: the decoder's test set, built in memory, each with the outcome it must get.

Used by the decoder tests and by every job's failure-handling tests (captioning, scoring), so
"bad input gets a recorded failure row, never a crash" is checked against one shared set.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np
from PIL import Image


@dataclass
class HostileCase:
    name: str
    data: bytes
    reason: str | None  # expected decode failure reason; None = decodes
    size: tuple[int, int] | None = None  # expected (width, height) after decoding
    flags: list[str] = field(default_factory=list)
    pixel: tuple[tuple[int, int], tuple[int, int, int]] | None = None  # ((x, y), expected RGB)


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _exif_rotated() -> bytes:
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    im.paste((0, 0, 255), (0, 0, 20, 20))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    return _save(im, "JPEG", exif=exif, quality=95)


def _palette_transparent() -> bytes:
    im = Image.new("P", (96, 96), 0)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    im.paste(1, (48, 0, 96, 96))  # right half red, left half index 0 (transparent)
    return _save(im, "PNG", transparency=0)


def _grey16() -> bytes:
    a = np.full((96, 96), 65535, dtype=np.uint16)
    a[:, :48] = 32768  # left half mid-grey in 16 bits: clipping to 8 bits would make it white
    return _save(Image.fromarray(a), "PNG")


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (80, 80), c) for c in ((0, 200, 0), (200, 0, 0), (0, 0, 200))]
    return _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def _bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header declaring 10^10 pixels, with a tiny (wrong-sized) data stream."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )


def hostile_cases() -> list[HostileCase]:
    rgb = Image.new("RGB", (120, 90), (10, 120, 230))
    jpeg = _save(rgb, "JPEG", quality=90)
    png = _save(Image.new("RGB", (120, 90), (10, 120, 230)), "PNG")
    rgba = Image.new("RGBA", (64, 64), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (0, 0, 32, 64))
    palette = _palette_transparent()
    cmyk = _save(Image.new("CMYK", (80, 80), (0, 255, 255, 0)), "JPEG")
    grey = _save(Image.new("L", (70, 70), 200), "JPEG", quality=95)
    webp = _save(Image.new("RGB", (100, 80), (0, 128, 0)), "WEBP", lossless=True)
    wide = _save(Image.new("RGB", (800, 100), (9, 9, 9)), "PNG")
    return [
        HostileCase("exif_rotated_jpeg", _exif_rotated(), None, (20, 40), ["tiny"], pixel=((10, 5), (0, 0, 255))),
        HostileCase("cmyk_jpeg", cmyk, None, (80, 80), pixel=((40, 40), (255, 0, 0))),
        HostileCase("palette_transparent_png", palette, None, (96, 96), pixel=((10, 10), (255, 255, 255))),
        HostileCase("rgba_png", _save(rgba, "PNG"), None, (64, 64), pixel=((48, 10), (255, 255, 255))),
        HostileCase("grey16_png", _grey16(), None, (96, 96), pixel=((10, 10), (128, 128, 128))),
        HostileCase("greyscale_jpeg", grey, None, (70, 70), pixel=((5, 5), (200, 200, 200))),
        HostileCase("webp", webp, None, (100, 80), pixel=((50, 40), (0, 128, 0))),
        HostileCase("animated_gif", _animated_gif(), None, (80, 80), ["animated"], pixel=((40, 40), (0, 200, 0))),
        HostileCase("tiny_png", _save(Image.new("RGB", (8, 8), (1, 2, 3)), "PNG"), None, (8, 8), ["tiny"]),
        HostileCase("extreme_aspect_png", wide, None, (800, 100), ["extreme_aspect"]),
        HostileCase("truncated_jpeg", jpeg[: len(jpeg) // 2], "truncated"),
        HostileCase("truncated_png", png[: len(png) - 30], "truncated"),
        HostileCase("zero_bytes", b"", "empty_file"),
        HostileCase("text_file", b"<html><body>404 not found</body></html>", "not_an_image"),
        HostileCase("pixel_limit_png", _bomb_png(9000, 9000), "too_many_pixels"),  # unicap's own limit
        HostileCase("decompression_bomb_png", _bomb_png(), "too_many_pixels"),  # Pillow's guard too
    ]


# ---------------------------------------------------------------- pixel data and memory (decode limits)
# PNGs whose zlib stream is complete but short (Pillow returns the missing rows as zeros, no error),
# and large valid PNGs built row by row (a 64M-pixel image in ~190 KB without holding its pixels).


def _png(width: int, height: int, bit_depth: int, colour_type: int, idat: bytes) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def short_stream_png(width: int = 7999, height: int = 7999, rows: int = 2, noise: bool = False) -> bytes:
    """An RGB PNG declaring width x height whose complete zlib stream holds only `rows` rows."""
    rng = np.random.default_rng(0)
    line = lambda: b"\x00" + (rng.integers(0, 256, width * 3, np.uint8).tobytes() if noise else bytes(width * 3))  # noqa: E731
    return _png(width, height, 8, 2, zlib.compress(b"".join(line() for _ in range(rows)), 9))


def large_png(width: int = 7999, height: int = 7999, grey: int = 90) -> bytes:
    """A complete, valid greyscale PNG of width x height (one colour), compressed row by row."""
    z, row, parts = zlib.compressobj(9), b"\x00" + bytes([grey]) * width, []
    for _ in range(height):
        parts.append(z.compress(row))
    parts.append(z.flush())
    return _png(width, height, 8, 0, b"".join(parts))


def pixel_data_cases() -> list[HostileCase]:
    """Truncated pixel data the decoder must refuse, and a large valid image it must deliver reduced."""
    return [
        HostileCase("short_stream_png_7999", short_stream_png(), "truncated"),  # ~130 bytes declaring 64M pixels
        HostileCase("half_rows_png", short_stream_png(600, 400, rows=200, noise=True), "truncated"),
        HostileCase("large_valid_png_7999", large_png(), None, (7999, 7999), pixel=((100, 100), (90, 90, 90))),
    ]
