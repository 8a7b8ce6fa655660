import math
import random

import torch

from train import flow


def test_interpolation_and_target():
    x0, x1 = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2) * 3
    xt, v = flow.interpolate(x0, x1, torch.tensor([0.25, 1.0]))
    assert torch.allclose(xt[0], torch.full((1, 2, 2), 0.75)) and torch.allclose(xt[1], x1[1])
    assert torch.allclose(v, torch.full_like(v, 3.0))


def test_time_shift_hand_values():
    mu = math.log(3.0)  # shift factor 3: noise level 0.5 -> 3*0.5 / (3*0.5 + 0.5) = 0.75
    assert abs(flow.time_shift(torch.tensor(0.5), mu).item() - 0.25) < 1e-7
    ends = flow.time_shift(torch.tensor([0.0, 1.0]), 1.0)
    assert torch.allclose(ends, torch.tensor([0.0, 1.0]))
    assert flow.shift_mu(256) == flow.BASE_SHIFT and abs(flow.shift_mu(4096) - flow.MAX_SHIFT) < 1e-12
    t = torch.linspace(0.01, 0.99, 50)
    assert (flow.time_shift(t, flow.shift_mu(4096)) <= flow.time_shift(t, flow.shift_mu(256))).all()


def test_time_distributions():
    g = torch.Generator().manual_seed(0)
    t = flow.sample_t(20000, dist="logit_normal", generator=g)
    assert 0 < t.min() and t.max() < 1 and abs(t.median().item() - 0.5) < 0.02
    u = flow.sample_t(20000, dist="uniform", generator=g)
    assert abs(u.mean().item() - 0.5) < 0.01
    shifted = flow.sample_t(20000, dist="logit_normal", mu=1.0, generator=torch.Generator().manual_seed(0))
    assert shifted.median() < t.median() - 0.1  # shifted toward noise


def test_loss_hand_value_and_lowres_term():
    pred, target = [torch.ones(1, 4, 4)], [torch.zeros(1, 4, 4)]
    assert flow.flow_loss(pred, target).item() == 1.0
    # checkerboard error: zero at 4x pooling, so the auxiliary term adds nothing
    cb = (torch.arange(16).view(4, 4) + torch.arange(4)[:, None]) % 2 * 2.0 - 1.0
    assert flow.flow_loss([cb[None]], [torch.zeros(1, 4, 4)], lowres_weight=0.5).item() == 1.0
    assert flow.flow_loss(pred, target, lowres_weight=0.5).item() == 1.5
    # per-sample means: a big and a small latent weigh the same
    two = flow.flow_loss([torch.ones(1, 8, 8), torch.zeros(1, 2, 2)], [torch.zeros(1, 8, 8), torch.zeros(1, 2, 2)])
    assert two.item() == 0.5


def test_caption_dropout_rate():
    out = flow.drop_captions(["a cat"] * 10000, 0.1, random.Random(0))
    assert 900 < out.count("") < 1100 and set(out) == {"", "a cat"}
