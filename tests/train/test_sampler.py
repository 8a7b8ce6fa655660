import math

import torch

from train import sampler


def test_euler_and_midpoint_are_exact_on_straight_paths():
    """With the ideal velocity toward a known x1, v = (x1 - x) / (1 - t), both samplers land on x1."""
    x1 = torch.randn(2, 3, 4, 4)
    noise = torch.randn_like(x1)

    def fn(x, t, cond):
        return (x1 - x) / (1 - t).view(-1, 1, 1, 1).clamp_min(1e-6)

    for method in ("euler", "midpoint"):
        out = sampler.sample(fn, noise, steps=7, solver=method, mu=1.0, cfg_scale=1.0)
        torch.testing.assert_close(out, x1, rtol=1e-4, atol=1e-4)


def test_euler_hand_computed():
    # dx/dt = 2 t on 2 steps from x=0: Euler gives 0 + 0.5 * 0 + 0.5 * 1 = 0.5; midpoint gives exactly 1
    def fn(x, t, cond):
        return (2 * t).view(-1, 1) * torch.ones_like(x)

    x = torch.zeros(1, 1)
    assert sampler.sample(fn, x, steps=2, cfg_scale=1.0).item() == 0.5
    assert abs(sampler.sample(fn, x, steps=2, solver="midpoint", cfg_scale=1.0).item() - 1.0) < 1e-6


def test_renormalisation_caps_the_guided_norm():
    v_c = torch.tensor([[3.0, 4.0]])  # norm 5
    big = torch.tensor([[30.0, 40.0]])
    assert torch.allclose(sampler.renormalise(big, v_c, 1.0), v_c)
    assert torch.allclose(sampler.renormalise(big, v_c, 2.0), 2 * v_c)
    small = torch.tensor([[0.3, 0.4]])
    assert torch.equal(sampler.renormalise(small, v_c, 1.0), small)  # below the cap: untouched
    assert torch.equal(sampler.renormalise(big, v_c, 0.0), big)  # 0 = off


def test_guidance_formula_and_truncation_steps():
    calls = []

    def fn(x, t, cond):
        calls.append(bool(cond))
        return torch.full_like(x, 1.0 if cond else 0.0)

    seen = []
    out = sampler.sample(
        fn,
        torch.zeros(1, 2),
        steps=4,
        cfg_scale=3.0,
        renorm_cfg=0.0,
        cfg_trunc=0.5,
        cfg_trunc_mode="step",
        on_step=lambda i, t, g: seen.append(g),
    )
    assert seen == [True, True, True, False]  # i/N = 0, .25, .5 guided; .75 not
    # guided steps: v = 0 + 3 * (1 - 0) = 3 over dt = .25 (x3 steps), last step v_c = 1
    assert torch.allclose(out, torch.full((1, 2), 3 * 0.25 * 3 + 0.25))
    assert calls.count(False) == 3  # the unconditional pass is skipped where guidance is off
    seen.clear()
    sampler.sample(
        fn,
        torch.zeros(1, 2),
        steps=4,
        mu=math.log(3.0),
        cfg_scale=3.0,
        cfg_trunc=0.5,
        cfg_trunc_mode="time",
        on_step=lambda i, t, g: seen.append((round(t, 4), g)),
    )
    # shifted times 1 - 3s/(3s + 1 - s): 0, 0.1, 0.25, 0.5 -> guided while t < 0.5
    assert seen == [(0.0, True), (0.1, True), (0.25, True), (0.5, False)]
