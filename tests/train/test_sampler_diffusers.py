"""The solvers drive diffusers' Lumina2Transformer2DModel (train.convert.diffusers_velocity) as they drive NextDiT:
the same latents from converted weights."""

import pytest
import torch
from diffusers import Lumina2Transformer2DModel

from tests.train.test_model import SMALL, randomised
from train import sampler
from train.convert import diffusers_config, diffusers_velocity, to_diffusers


@pytest.mark.parametrize("solver", ["euler", "dpm++2m", "ab3"])
def test_the_solvers_draw_the_same_latents_through_diffusers(solver):
    ours = randomised(SMALL)
    ref = Lumina2Transformer2DModel(**diffusers_config(SMALL)).eval()
    ref.load_state_dict(to_diffusers(ours.state_dict(), SMALL), strict=True)
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(2, SMALL.in_channels, 6, 6, generator=g)
    branches = {
        c: (torch.randn(2, 5, SMALL.cap_feat_dim, generator=g), torch.ones(2, 5, dtype=torch.bool))
        for c in (True, False)
    }

    def velocity(x, t, cond):
        return ours(x, t, *branches[cond])

    kw = dict(steps=5, solver=solver, mu=0.5, cfg_scale=3.0)
    a = sampler.sample(velocity, noise, **kw)
    b = sampler.sample(diffusers_velocity(ref, branches), noise, **kw)
    assert ((a - b).abs().max() / a.abs().max()).item() < 1e-4
