"""The trainer's sample grid draws with the configured sampler and records it in the PNG; the step cache only with
calibrated coefficients (the stage's final/ or its init weights')."""

import json

import pytest
from PIL import Image

from tests.train.test_model import randomised
from train import config as train_config
from train.codecs import VAE, TextEncoder
from train.model import NextDiT_configs
from train.sample import SAMPLING_KEY
from train.step import Codecs
from train.step_cache import save_coefficients
from train.trainer import sample_grid


def test_the_grid_records_its_sampler_and_uses_a_calibration_when_there_is_one(tmp_path):
    overrides = ["model.vae=tiny", "model.text_encoder=tiny", "data.resolution=32", f"run.out={tmp_path}"]
    overrides += ["run.sample_prompts=['a red circle', '两个蓝色的正方形']", "run.sample_steps=6"]
    overrides += ["run.sample_cache_threshold=0.3"]
    cfg = train_config.load("train/configs/stage1_cpu.yaml", overrides)
    model_cfg = NextDiT_configs["NextDiT_tiny"]
    state = randomised(model_cfg).state_dict()
    codecs = Codecs(TextEncoder("tiny"), VAE("tiny"))
    path = tmp_path / "stage1" / "samples" / "step-00000006.png"
    sample_grid(cfg, state, model_cfg, codecs, path)
    meta = json.loads(Image.open(path).text[SAMPLING_KEY])
    assert meta["solver"] == cfg.run.sample_solver and meta["steps"] == 6
    assert meta["cache"] == "off" and meta["evaluations"] == meta["forwards"] == 12  # no calibration: no cache
    save_coefficients(tmp_path / "stage1" / "final", [1.0, 0.0], {})  # a stage re-run after calibrate-cache
    sample_grid(cfg, state, model_cfg, codecs, path)
    meta = json.loads(Image.open(path).text[SAMPLING_KEY])
    assert meta["cache"] == "calibrated" and meta["cache_threshold"] == cfg.run.sample_cache_threshold


def test_a_grid_the_sampler_cannot_draw_is_refused_before_training():
    with pytest.raises(ValueError, match="run.sample_solver"):
        train_config.load("train/configs/stage1_cpu.yaml", ["run.sample_solver=ab3", "run.sample_steps=2"])
    with pytest.raises(ValueError, match="unknown solver"):
        train_config.load("train/configs/stage1_cpu.yaml", ["run.sample_solver=rk4"])
    train_config.load("train/configs/stage1_cpu.yaml", ["run.sample_solver=rk4", "run.sample_prompts=[]"])  # no grid
