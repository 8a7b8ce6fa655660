"""The GPU path on a real GPU (`gpu` marker: skipped without CUDA, run by make gpu-check). The same rules are
guarded on CPU by test_devices.py, test_rank_failure.py and tests/unicap/test_distributed.py."""

from __future__ import annotations

import os

import pytest
import torch

from tests.conftest import free_port

pytestmark = pytest.mark.gpu


def test_generate_runs_on_the_models_gpu_in_bf16():
    from train.codecs import VAE, TextEncoder
    from train.model import NextDiT, NextDiT_configs
    from train.sample import generate

    te = TextEncoder("tiny", dtype=torch.bfloat16).to("cuda")
    vae = VAE("tiny", dtype=torch.bfloat16).to("cuda")
    torch.manual_seed(0)
    model = NextDiT(NextDiT_configs["NextDiT_tiny"]).to("cuda", torch.bfloat16).eval()
    images = generate(model, te, vae, ["a red circle", "两个蓝色的正方形"], width=64, height=64, steps=2)
    assert [im.size for im in images] == [(64, 64), (64, 64)]


def test_agree_under_nccl_puts_its_tensor_on_the_gpu(monkeypatch):
    import torch.distributed as dist

    from unicap import distributed

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    try:
        assert distributed.collective_device().type == "cuda"
        sums, flags = distributed.agree([torch.tensor(2.0, device="cuda"), 3], flags=[True])
        assert sums == [2.0, 3.0] and flags == [True]
        distributed.barrier()
    finally:
        dist.destroy_process_group()
    assert os.environ["MASTER_ADDR"] == "127.0.0.1"
