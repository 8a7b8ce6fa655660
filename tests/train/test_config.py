"""Both trainers' configs (train.config, train.captioner.config) on their shared base (train.config_base):
the same checks, batch arithmetic and DeepSpeed config, each with its own sections and limits."""

from __future__ import annotations

import pytest

from train import config as dit_config
from train.captioner import config as captioner_config
from unicap.config import ConfigError

TRAINERS = [dit_config, captioner_config]


@pytest.mark.parametrize("module", TRAINERS, ids=["nextdit", "captioner"])
def test_batch_arithmetic_and_the_deepspeed_config(module):
    cfg = module.load(None, ["data.micro_batch=2", "data.global_batch=16", "optim.grad_clip=0.5"])
    assert cfg.grad_accum(2) == 4 and cfg.global_batch(2) == 16
    ds = module.deepspeed_config(cfg, 2, "cpu")
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == 16 and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == cfg.deepspeed.zero_stage == 2
    assert ds["zero_optimization"]["contiguous_gradients"] is True
    with pytest.raises(ValueError, match="data.global_batch 16 is not a multiple of micro_batch 2 x world size 3 = 6"):
        cfg.grad_accum(3)
    unset = module.load(None, ["optim.grad_accum=3"])
    assert unset.grad_accum(5) == 3 and unset.global_batch(5) == unset.data.micro_batch * 3 * 5


def test_each_trainer_keeps_its_own_deepspeed_settings():
    dit = dit_config.load(None, ["deepspeed.zero_stage=3", "deepspeed.overlap_comm=false"])
    ds = dit_config.deepspeed_config(dit, 1, "cpu")
    assert ds["bf16"]["check_grad_overflow"] is False  # the trainer's GradGuard checks instead
    zero = ds["zero_optimization"]
    assert zero["overlap_comm"] is False and zero["reduce_bucket_size"] == dit.deepspeed.reduce_bucket_size
    assert zero["stage3_param_persistence_threshold"] == 0
    cap = captioner_config.deepspeed_config(captioner_config.load(), 1, "cpu")
    assert "check_grad_overflow" not in cap["bf16"]
    assert cap["zero_optimization"] == {
        "stage": 2,
        "contiguous_gradients": True,
        "overlap_comm": False,
        "reduce_bucket_size": 50_000_000,
    }


@pytest.mark.parametrize(
    "module, override, message",
    [
        (dit_config, "deepspeed.zero_stage=4", "deepspeed.zero_stage 4: 0, 1, 2 or 3"),
        (captioner_config, "deepspeed.zero_stage=0", "deepspeed.zero_stage 0: 1, 2 or 3"),
        (dit_config, "deepspeed.precision=fp16", "deepspeed.precision 'fp16': auto, bf16 or fp32"),
        (captioner_config, "deepspeed.precision=fp16", "deepspeed.precision 'fp16': auto, bf16 or fp32"),
        (dit_config, "run.keep_last=0", "run.keep_last must be >= 1, got 0"),
        (captioner_config, "optim.grad_accum=0", "optim.grad_accum must be >= 1, got 0"),
        (dit_config, "data.resolution=0", "data.resolution must be >= 1, got 0"),
        (captioner_config, "data.max_pixels=0", "data.max_pixels must be >= 1, got 0"),
        (captioner_config, "optim.schedule=linear", "optim.schedule 'linear': cosine or constant"),
        (captioner_config, "data.source=web", "data.source 'web': synth or folder"),
        (dit_config, "run.stage=stage4", "run.stage 'stage4': one of"),
    ],
)
def test_a_bad_value_is_an_error_naming_the_field(module, override, message):
    with pytest.raises(ConfigError) as e:
        module.load(None, [override])
    assert message in str(e.value)
