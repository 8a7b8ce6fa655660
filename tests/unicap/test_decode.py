import pytest

from datagen.hostile import hostile_cases
from unicap.decode import DECODE_REASONS, decode_image

CASES = hostile_cases()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_image_gets_the_right_outcome(case):
    d = decode_image(case.data)
    assert d.reason == case.reason, d.error
    if case.reason is None:
        assert d.image.mode == "RGB"
        assert (d.width, d.height) == case.size == d.image.size
        assert d.flags == case.flags
        if case.pixel:
            (x, y), expected = case.pixel
            got = d.image.getpixel((x, y))
            assert max(abs(a - b) for a, b in zip(got, expected, strict=True)) <= 3, (got, expected)
    else:
        assert d.image is None
        assert d.reason in DECODE_REASONS
        assert d.error.startswith(case.reason + ": ") and len(d.error) > len(case.reason) + 2


def test_pixel_limit_is_checked_before_decoding():
    bomb = next(c for c in CASES if c.name == "pixel_limit_png").data
    assert decode_image(bomb).reason == "too_many_pixels"
    # the same header under a higher limit is read further and fails on its (tiny) data instead
    assert decode_image(bomb, max_pixels=10**9).reason in ("truncated", "corrupt")


def test_flags_follow_thresholds():
    tiny = next(c for c in CASES if c.name == "tiny_png").data
    assert decode_image(tiny, min_side=4).flags == []
    wide = next(c for c in CASES if c.name == "extreme_aspect_png").data
    assert decode_image(wide, max_aspect=10).flags == []
