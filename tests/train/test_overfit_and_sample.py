"""A tiny Next-DiT overfits a handful of synthetic images on CPU, then `unicap sample` draws from it."""

import io
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datagen.synth import synth_item
from train import flow
from train.checkpoint import save_weights
from train.codecs import VAE, TextEncoder
from train.model import NextDiT_configs, build_model

# slow: 600 training steps and a `unicap sample` run: make test runs it, make test-fast does not
pytestmark = pytest.mark.slow

UNICAP = str(Path(sys.executable).with_name("unicap"))
CFG = NextDiT_configs["NextDiT_tiny"]  # the CPU trainer's model: fits the tiny codecs (16 latent channels, 32-d text)
STEPS = 600


@pytest.fixture(scope="module")
def overfit(tmp_path_factory):
    torch.manual_seed(0)
    te, vae = TextEncoder("tiny"), VAE("tiny")
    items = [synth_item(0, i) for i in range(4)]

    def pixels(image: bytes) -> torch.Tensor:
        """(3, 64, 64) in [-1, 1]"""
        rgb = np.array(Image.open(io.BytesIO(image)).convert("RGB").resize((64, 64)))
        return torch.from_numpy(rgb).permute(2, 0, 1).float() / 127.5 - 1

    imgs = [pixels(it.image) for it, _ in items]
    x1 = vae.encode(torch.stack(imgs))
    x1 = (x1 - x1.mean()) / x1.std()  # unit-scale targets: the random tiny VAE's latents are small
    feats, mask = te([caps["caption_short_en"] for _, caps in items])
    model = build_model(CFG)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / STEPS)))
    g = torch.Generator().manual_seed(1)
    ev_x0, ev_t = torch.randn(16, *x1.shape[1:], generator=g), flow.sample_t(16, generator=g)

    def eval_loss():
        with torch.no_grad():
            xt, v = flow.interpolate(ev_x0, x1.repeat(4, 1, 1, 1), ev_t)
            return flow.flow_loss(model(xt, ev_t, feats.repeat(4, 1, 1), mask.repeat(4, 1)), v).item()

    before = eval_loss()
    for _ in range(STEPS):
        t = flow.sample_t(4, generator=g)
        xt, v = flow.interpolate(torch.randn(x1.shape, generator=g), x1, t)
        loss = flow.flow_loss(model(xt, t, feats, mask), v)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    ckpt = save_weights(tmp_path_factory.mktemp("ckpt") / "tiny", model, "tiny", "tiny", step=STEPS)
    return before, eval_loss(), ckpt, [caps["caption_short_en"] for _, caps in items]


def test_loss_falls_by_an_order_of_magnitude(overfit):
    before, after, _, _ = overfit
    print(f"overfit: eval loss {before:.3f} -> {after:.3f} ({before / after:.1f}x) in {STEPS} steps")
    assert after < before / 10, (before, after)


def test_sample_command_writes_deterministic_pngs(overfit, tmp_path):
    _, _, ckpt, prompts = overfit
    cmd = [UNICAP, "sample", "--ckpt", str(ckpt), "--prompt", prompts[0], "--prompt", "两个蓝色的圆形"]
    cmd += ["--size", "64x64", "--steps", "6", "--cfg", "3.0", "--seed", "5"]
    for out in ("a", "b"):
        r = subprocess.run([*cmd, "--out", str(tmp_path / out)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
    pngs = sorted((tmp_path / "a").glob("*.png"))
    assert len(pngs) == 2 and pngs[0].name.endswith("_seed5.png") and pngs[1].name.endswith("_seed6.png")
    for p in pngs:
        im = Image.open(p)
        assert im.size == (64, 64) and im.mode == "RGB"
        assert p.read_bytes() == (tmp_path / "b" / p.name).read_bytes()  # same seed, same image
    assert pngs[0].read_bytes() != pngs[1].read_bytes()
