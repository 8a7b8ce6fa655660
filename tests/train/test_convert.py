"""Our Next-DiT against diffusers' Lumina2Transformer2DModel with converted weights, both directions."""

import dataclasses

import pytest
import torch
from diffusers import Lumina2Transformer2DModel

from tests.train.test_model import SMALL, randomised
from train.convert import (
    config_from_diffusers,
    diffusers_config,
    from_diffusers,
    from_original,
    nextdit_from_diffusers,
    to_diffusers,
)
from train.model import NextDiT_configs, build_model

# beside SMALL: two refiner layers of each kind, a text width unlike the model's, 16 latent channels and an FFN
# width rounded to 48 (4 x 128 -> 528)
OTHER = dataclasses.replace(
    NextDiT_configs["NextDiT_tiny"], n_layers=3, n_refiner_layers=2, cap_feat_dim=48, multiple_of=48
)


def inputs(cfg, B=3, L=9, H=6, W=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, cfg.in_channels, H, W, generator=g)
    t = torch.rand(B, generator=g)
    cap = torch.randn(B, L, cfg.cap_feat_dim, generator=g)
    lens = torch.tensor([L, max(1, L // 3), max(1, L - 2)][:B])
    mask = torch.arange(L)[None] < lens[:, None]  # different text lengths in one batch
    return x, t, cap, mask


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("cfg, hw", [(SMALL, (6, 10)), (OTHER, (14, 6)), (OTHER, (2, 18))])
def test_ours_to_diffusers_same_output(cfg, hw):
    ours = randomised(cfg)
    ref = Lumina2Transformer2DModel(**diffusers_config(cfg)).eval()
    ref.load_state_dict(to_diffusers(ours.state_dict(), cfg), strict=True)
    x, t, cap, mask = inputs(cfg, H=hw[0], W=hw[1])
    with torch.no_grad():
        a = ours(x, t, cap, mask)
        b = ref(x, t, cap, mask, return_dict=False)[0]
    assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("cfg", [SMALL, OTHER])
def test_diffusers_to_ours_same_output(cfg):
    torch.manual_seed(3)
    ref = Lumina2Transformer2DModel(**diffusers_config(cfg)).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.1)
    ours = nextdit_from_diffusers(ref).eval()
    assert config_from_diffusers(ref.config) == cfg
    x, t, cap, mask = inputs(cfg, B=2, H=8, W=8)
    with torch.no_grad():
        assert rel_err(ours(x, t, cap, mask), ref(x, t, cap, mask, return_dict=False)[0]) < 1e-5
    # and back again: a lossless round trip
    back = to_diffusers(from_diffusers(ref.state_dict(), cfg), cfg)
    assert back.keys() == ref.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in ref.state_dict().items())


def test_original_release_layout_loads():
    m = build_model(SMALL)
    release = {f"model.diffusion_model.{k}": v for k, v in m.state_dict().items()}
    release["model.diffusion_model.norm_final.weight"] = torch.ones(SMALL.dim)  # unused in the release
    m2 = build_model(SMALL)
    m2.load_state_dict(from_original(release), strict=True)


def test_options_diffusers_cannot_hold_are_refused_not_exported_wrong(tmp_path, capsys):
    from train.checkpoint import save_weights
    from train.convert import diffusers_config, main, not_in_diffusers

    tiny = NextDiT_configs["NextDiT_tiny"]
    assert not_in_diffusers(tiny) is None and diffusers_config(tiny)["hidden_size"] == tiny.dim
    other = dataclasses.replace(tiny, rope_theta=100.0)
    assert "rope_theta 100" in not_in_diffusers(other)
    with pytest.raises(ValueError, match="no diffusers export: rope_theta 100"):
        diffusers_config(other)
    framed = dataclasses.replace(tiny, frame_pos=True)
    assert "frame_pos" in not_in_diffusers(framed)
    save_weights(tmp_path / "w", build_model(framed), "tiny-clip", "tiny-trained")
    assert main(["--to", "diffusers", str(tmp_path / "w"), str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()
    assert capsys.readouterr().err.count("\n") == 1  # one line
