import io
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from datagen.hostile import hostile_cases, large_png, pixel_data_cases, short_stream_png
from unicap.decode import DECODE_REASONS, DEFAULT_MAX_OUTPUT_PIXELS, decode_image

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


# ---------------------------------------------------------------- pixel data and memory within limits

PIXEL_CASES = pixel_data_cases()


@pytest.mark.parametrize("case", PIXEL_CASES, ids=[c.name for c in PIXEL_CASES])
def test_truncated_pixel_data_is_refused_and_large_images_come_back_reduced(case):
    """A PNG whose complete zlib stream is shorter than its header decoded as ok (the missing rows
    black); a 130-byte file declaring 7999 x 7999 took ~190 MB doing so."""
    d = decode_image(case.data)
    assert d.reason == case.reason, d.error
    if case.reason is None:
        assert (d.width, d.height) == case.size  # the original's size, for the records
        assert d.image.width * d.image.height <= DEFAULT_MAX_OUTPUT_PIXELS and d.image.mode == "RGB"
        assert abs(d.image.width / d.image.height - case.size[0] / case.size[1]) < 0.01
        (x, y), rgb = case.pixel
        assert d.image.getpixel((x, y)) == rgb


def test_jpeg_is_decoded_at_reduced_scale_and_orientation_survives():
    im = Image.new("RGB", (3000, 1000), (200, 30, 30))
    im.paste((30, 30, 200), (0, 0, 1500, 1000))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display: blue on top
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif, quality=90)
    d = decode_image(buf.getvalue(), max_output_pixels=400 * 400)
    assert (d.width, d.height) == (1000, 3000) and d.flags == []
    assert d.image.width * d.image.height <= 400 * 400 and d.image.height > d.image.width
    top, bottom = d.image.getpixel((d.image.width // 2, 5)), d.image.getpixel((d.image.width // 2, d.image.height - 5))
    assert top[2] > 150 > top[0] and bottom[0] > 150 > bottom[2]
    assert decode_image(buf.getvalue()).image.size == (1000, 3000)  # under the default cap: untouched


BATCH_PROBE = """
import resource, sys
from pathlib import Path
from unicap.decode import decode_image
files = sorted(Path(sys.argv[1]).iterdir())
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
batch = [decode_image(f.read_bytes()) for f in files]  # held together, as a job's batch is
print(sum(d.ok for d in batch), (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)
"""


def test_a_batch_of_large_images_and_bombs_stays_within_its_memory_budget(tmp_path):
    """Eight 64M-pixel images in a batch took 2.3 GB; now each is decoded, reduced and held at
    <= 2048 x 2048 (12 MB RGB): 8 x 12 MB + one transient decode."""
    big = large_png()
    jpeg = io.BytesIO()
    Image.new("RGB", (6000, 4000), (20, 140, 60)).save(jpeg, "JPEG", quality=80)
    for i in range(4):
        (tmp_path / f"png{i}.png").write_bytes(big)
        (tmp_path / f"jpg{i}.jpg").write_bytes(jpeg.getvalue())
        (tmp_path / f"bomb{i}.png").write_bytes(short_stream_png())
    repo = Path(__file__).resolve().parents[2]
    argv = [sys.executable, "-c", BATCH_PROBE, str(tmp_path)]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, cwd=repo).stdout.split()
    ok, grown_mb = int(out[0]), int(out[1])
    assert ok == 8  # the bombs are refused, the large images delivered
    assert grown_mb < 8 * 12 + 64 + 100, grown_mb  # unbounded: 8 x 192 MB of RGB (and more in conversion)
