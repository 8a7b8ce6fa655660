"""Aspect-ratio buckets: every training image is resized to one of a few sizes of about equal area.

    table = bucket_table(256)                    # [(256, 256), (224, 288), ...]: w*h ~ 256^2
    b = assign_bucket(widths, heights, table)    # (N,) int16: nearest log aspect ratio
    im = resize_to_bucket(image, table[b[0]])    # cover, then centre crop

Sides are multiples of `multiple` = VAE factor (8) x patch size (2) = 16, so every bucket is a whole
number of latent patches; a batch holds one bucket, so no padding is ever trained on. The bucket
is chosen from width/height alone (the manifest's), never by decoding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps

# width:height, 1:4 ... 4:1: the portrait ratios, 1:1, then their landscape mirrors
PORTRAIT_RATIOS: tuple[tuple[int, int], ...] = ((1, 4), (1, 3), (1, 2), (9, 16), (2, 3), (3, 4), (4, 5))
LANDSCAPE_RATIOS = tuple((h, w) for w, h in reversed(PORTRAIT_RATIOS))
DEFAULT_RATIOS: tuple[tuple[int, int], ...] = (*PORTRAIT_RATIOS, (1, 1), *LANDSCAPE_RATIOS)


def _best_size(area: float, ratio: float, multiple: int) -> tuple[int, int]:
    """(w, h), multiples of `multiple`, closest to w/h = ratio and w*h = area (log errors summed)."""
    w0, h0 = math.sqrt(area * ratio) / multiple, math.sqrt(area / ratio) / multiple
    best, err = None, math.inf
    for w in {max(1, math.floor(w0)), max(1, math.ceil(w0))}:
        for h in {max(1, math.floor(h0)), max(1, math.ceil(h0))}:
            e = abs(math.log(w * h * multiple**2 / area)) + abs(math.log(w / h / ratio))
            if e < err:
                best, err = (w * multiple, h * multiple), e
    return best


def bucket_table(
    resolution: int, multiple: int = 16, ratios: Sequence[tuple[int, int]] = DEFAULT_RATIOS
) -> list[tuple[int, int]]:
    """Bucket sizes (w, h) with w*h ~ resolution^2, sides multiples of `multiple`, sorted by w/h."""
    if resolution % multiple:
        raise ValueError(f"resolution {resolution} is not a multiple of {multiple} (VAE factor x patch size)")
    sizes = set()
    for a, b in ratios:  # portrait = the landscape size transposed: the table is symmetric
        w, h = _best_size(resolution**2, max(a, b) / min(a, b), multiple)
        sizes.add((w, h) if a >= b else (h, w))
    return sorted(sizes, key=lambda s: (s[0] / s[1], s[0]))


def assign_bucket(width, height, table: Sequence[tuple[int, int]]) -> np.ndarray:
    """Index of the bucket with the nearest log aspect ratio, for arrays (or scalars) of sizes; int16."""
    w = np.asarray(width, dtype=np.float64)
    h = np.asarray(height, dtype=np.float64)
    log_ar = np.log(np.maximum(w, 1) / np.maximum(h, 1))  # (N,)
    table_ar = np.log(np.array([tw / th for tw, th in table]))  # (K,)
    return np.abs(log_ar[..., None] - table_ar).argmin(axis=-1).astype(np.int16)  # (N,)


def resize_to_bucket(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Scale `image` to cover `size` (w, h), then crop the centre: no padding, no distortion."""
    if image.size == tuple(size):
        return image
    return ImageOps.fit(image, tuple(size), method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))
