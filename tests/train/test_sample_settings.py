"""`unicap sample`, `unicap calibrate-cache` and `unicap adherence` with the sampler settings: bad settings in one
line, the calibration file beside the weights, the settings and evaluation counts in every output."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from tests.train.test_model import randomised
from train.checkpoint import save_weights
from train.codecs import VAE, TextEncoder
from train.model import NextDiT_configs
from train.sample import DEFAULT_SAMPLING, SAMPLING_KEY, generate, sampling_of
from train.step_cache import COEFFICIENTS_FILE, load_coefficients
from unicap.cli import module_main

PROMPTS = ["--prompt", "a red circle", "--prompt", "两个蓝色的正方形"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return save_weights(
        tmp_path_factory.mktemp("w") / "final", randomised(NextDiT_configs["NextDiT_tiny"]), "tiny", "tiny"
    )


def sample(folder, out, *args) -> int:
    return module_main("train.sample", ["--ckpt", str(folder), *PROMPTS, "--out", str(out), "--size", "32x32", *args])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--cache-threshold", "-0.5"], "--cache-threshold must be >= 0"),
        (["--solver", "rk4"], "unknown solver 'rk4'"),
        (["--solver", "ab3", "--steps", "2"], "ab3 needs at least 3 steps"),
        (["--steps", "0"], "needs at least"),
        (["--cache-threshold", "0.3", "--steps", "4"], f"has no {COEFFICIENTS_FILE}; run `unicap calibrate-cache"),
    ],
)
def test_bad_settings_are_refused_in_one_line(weights, tmp_path, capsys, args, message):
    assert sample(weights, tmp_path / "out", *args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()  # refused before anything was drawn


def test_every_png_records_its_settings(weights, tmp_path):
    assert sample(weights, tmp_path / "out", "--solver", "ab2", "--steps", "4", "--cfg", "2.0") == 0
    pngs = sorted((tmp_path / "out").glob("*.png"))
    assert len(pngs) == 2
    for png in pngs:
        meta = json.loads(Image.open(png).text[SAMPLING_KEY])
        beside = json.loads(png.with_suffix(".json").read_text())
        assert meta["solver"] == beside["solver"] == "ab2" and meta["steps"] == 4 and meta["cfg_scale"] == 2.0
        assert meta["cache"] == "off" and meta["cache_threshold"] == 0.0  # not calibrated: the cache stays off
        assert meta["evaluations"] == meta["forwards"] == 8  # 4 steps x 2 branches, nothing skipped
        assert beside["args"] == "--solver ab2 --steps 4 --cache-threshold 0"
    assert [json.loads(Image.open(p).text[SAMPLING_KEY])["seed"] for p in pngs] == [0, 1]


def test_calibration_then_the_default_sampling_uses_the_cache(weights, tmp_path, capsys):
    size = ["--size", "32x32", "--steps", "6,12", "--prompt", "a red circle", "--prompt", "三个绿色的三角形"]
    assert module_main("train.calibrate_cache", ["--ckpt", str(weights), *size]) == 0
    assert "pairs" in capsys.readouterr().out
    data = json.loads((weights / COEFFICIENTS_FILE).read_text())
    assert len(data["coefficients"]) == 2 and data["fit"]["pairs"] == 2 * (5 + 11)  # two branches, 5 + 11 pairs each
    assert data["calibration"]["steps"] == [6, 12] and data["calibration"]["size"] == [32, 32]
    assert load_coefficients(weights) == data["coefficients"]
    try:
        assert sample(weights, tmp_path / "out") == 0  # the defaults: the measured threshold, on calibrated weights
        meta = json.loads(Image.open(sorted((tmp_path / "out").glob("*.png"))[0]).text[SAMPLING_KEY])
        assert meta["cache_threshold"] == DEFAULT_SAMPLING["cache_threshold"]
        assert meta["solver"] == DEFAULT_SAMPLING["solver"] and meta["steps"] == DEFAULT_SAMPLING["steps"]
        assert meta["forwards"] == 2 * DEFAULT_SAMPLING["steps"]
        assert sample(weights, tmp_path / "on", "--cache-threshold", "0.5", "--steps", "12") == 0
        meta = json.loads(Image.open(sorted((tmp_path / "on").glob("*.png"))[0]).text[SAMPLING_KEY])
        assert meta["cache"] == "calibrated" and meta["forwards"] == 24 and 4 <= meta["evaluations"] < 24
        assert sample(weights, tmp_path / "off", "--cache-threshold", "0") == 0  # and 0 turns it off
        meta = json.loads(Image.open(sorted((tmp_path / "off").glob("*.png"))[0]).text[SAMPLING_KEY])
        assert meta["cache"] == "off" and meta["evaluations"] == meta["forwards"]
    finally:
        (weights / COEFFICIENTS_FILE).unlink()


def test_generate_counts_evaluations_and_skips_with_a_threshold():
    torch.manual_seed(0)
    model = randomised(NextDiT_configs["NextDiT_tiny"])
    te, vae = TextEncoder("tiny"), VAE("tiny")
    kw = dict(width=32, height=32, steps=10, solver="euler", cfg_scale=3.0)
    exact = generate(model, te, vae, ["a red circle", "a blue square"], **kw)
    skipping = generate(model, te, vae, ["a red circle", "a blue square"], cache_threshold=10.0, **kw)
    a, b = sampling_of(exact[0]), sampling_of(skipping[0])
    assert a["evaluations"] == a["forwards"] == 20 and a["cache"] == "off"
    assert b["forwards"] == 20 and b["evaluations"] == 4 and b["cache"] == "uncalibrated"  # first and last steps


def test_adherence_records_its_sampling(weights, tmp_path):
    from datagen.synth import synth
    from train.adherence import adherence

    synth(str(tmp_path / "heldout"), 3, seed=5)
    kw = dict(n=2, size=(32, 32), steps=3, examples=0, control=False, solver="dpm++2m")
    result = adherence({"w": weights}, tmp_path / "heldout", tmp_path / "out", **kw)
    s = result["sampling"]
    assert s["solver"] == "dpm++2m" and s["steps"] == 3 and s["cache_threshold"] == 0.0
    assert s["evaluations_per_image"] == {"w": 6.0} and "--solver dpm++2m --steps 3" in s["args"]
    with pytest.raises(ValueError, match="calibrate-cache"):
        adherence({"w": weights}, tmp_path / "heldout", tmp_path / "out2", **{**kw, "cache_threshold": 0.2})
