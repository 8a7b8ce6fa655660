"""The Samples section names the sampler settings a grid was drawn with (the PNG's text chunk)."""

import io
import json

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from unicap.report.training import SAMPLING_KEY, grid_sampling, sampling_line


def png(text: dict | None) -> bytes:
    info = PngInfo()
    for k, v in (text or {}).items():
        info.add_text(k, v)
    buf = io.BytesIO()
    Image.new("RGB", (8, 4)).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def test_the_grid_settings_are_read_back_and_named():
    from train.sample import SAMPLING_KEY as WRITTEN

    assert SAMPLING_KEY == WRITTEN  # the report reads what the trainer writes
    meta = {"solver": "dpm++2m", "steps": 20, "cache_threshold": 0.3, "cache": "calibrated", "cfg_scale": 4.0}
    meta |= {"evaluations": 22, "args": "--solver dpm++2m --steps 20 --cache-threshold 0.3"}
    read = grid_sampling(png({SAMPLING_KEY: json.dumps(meta)}))
    assert read == meta
    line = sampling_line(read)
    assert "dpm++2m, 20 steps, step cache threshold 0.3 (calibrated), guidance 4.0" in line
    assert "22 transformer evaluations per image" in line and "--cache-threshold 0.3" in line
    off = sampling_line({**meta, "cache_threshold": 0.0, "cache": "off"})
    assert "no step cache" in off


def test_a_grid_without_settings_says_so():
    assert grid_sampling(png(None)) is None
    assert grid_sampling(png({SAMPLING_KEY: "not json"})) is None
    assert grid_sampling(b"not a png") is None
    assert "not recorded" in sampling_line(None)
