"""Aspect-ratio buckets: sizes, assignment from width/height, cover-and-crop resizing."""

import numpy as np
import pytest
from PIL import Image

from train.buckets import assign_bucket, bucket_table, resize_to_bucket


@pytest.mark.parametrize("resolution", [256, 512, 1024])
def test_bucket_sides_are_patch_multiples_of_about_equal_area(resolution):
    table = bucket_table(resolution)
    assert len(table) == len(set(table)) >= 13
    for w, h in table:
        assert w % 16 == 0 and h % 16 == 0
        assert abs(w * h / resolution**2 - 1) < 0.1
    assert (resolution, resolution) in table
    assert sorted((h, w) for w, h in table) == sorted(table)  # portrait = landscape transposed
    ratios = [w / h for w, h in table]
    assert ratios == sorted(ratios) and min(ratios) == pytest.approx(1 / 4) and max(ratios) == pytest.approx(4)


def test_assign_bucket_nearest_log_aspect_vectorised():
    table = bucket_table(256)
    w = np.array([256, 1000, 512, 300, 10, 1920])
    h = np.array([256, 500, 2048, 4000, 1000, 1080])
    b = assign_bucket(w, h, table)
    assert b.dtype == np.int16 and b.shape == (6,)
    got = [table[i] for i in b]
    assert got[0] == (256, 256) and got[1][0] / got[1][1] == pytest.approx(2, rel=0.05)
    assert got[2] == (128, 512) and got[3] == (128, 512) and got[4] == (128, 512)  # 1:4 and beyond
    assert got[5][0] / got[5][1] == pytest.approx(16 / 9, rel=0.05)
    nearest = min(table, key=lambda s: abs(np.log(s[0] / s[1]) - np.log(4 / 3)))
    assert table[int(assign_bucket(640, 480, table))] == nearest


def test_resize_covers_then_crops_the_centre():
    im = Image.new("RGB", (400, 100), "red")  # 4:1 with a blue centre band
    im.paste((0, 0, 255), (175, 0, 225, 100))
    out = resize_to_bucket(im, (256, 256))  # scaled to 1024 x 256, then x in [384, 640) kept: [150, 250) here
    assert out.size == (256, 256)
    a = np.asarray(out)
    assert a[128, 128, 2] > 200 and a[128, 5, 0] > 200 and a[128, 250, 0] > 200  # centre kept, sides red
