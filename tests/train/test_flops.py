import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from train.flops import forward_flops, train_step_flops
from train.model import NextDiT_configs, NextDiTConfig, build_model

ODD = NextDiTConfig(
    dim=96,
    n_layers=3,
    n_refiner_layers=2,
    n_heads=6,
    n_kv_heads=2,
    cap_feat_dim=40,
    axes_dims=(4, 6, 6),
    multiple_of=48,
    in_channels=4,
)


def counted(cfg, cap_lens, grids, backend="sdpa"):
    """FLOPs torch's counter sees in one forward (math SDPA, so the attention products are counted)."""
    m = build_model(cfg).eval()
    m.set_attention_backend(backend)
    L = max(cap_lens)
    xs = [torch.randn(cfg.in_channels, cfg.patch_size * h, cfg.patch_size * w) for h, w in grids]
    mask = torch.arange(L)[None] < torch.tensor(cap_lens)[:, None]
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        m(xs, torch.rand(len(xs)), torch.randn(len(xs), L, cfg.cap_feat_dim), mask)
    return fc.get_total_flops()


def test_forward_flops_match_torch_counter():
    for cfg in (NextDiT_configs["NextDiT_XS"], ODD):
        assert counted(cfg, [7, 7], [(3, 5), (3, 5)]) == forward_flops(cfg, [7, 7], [15, 15])


def test_ragged_batch_counts_only_valid_tokens():
    """Packed attention skips the padding in attention; linears still run over the padded layout,
    so the executed count sits between the useful count and the fully padded one."""
    cfg, caps, grids = ODD, [9, 2, 5], [(4, 4), (2, 6), (1, 3)]
    imgs = [h * w for h, w in grids]
    useful = forward_flops(cfg, caps, imgs)
    padded = forward_flops(cfg, [9] * 3, [16] * 3)
    executed = counted(cfg, caps, grids, backend="torch_varlen")
    assert useful < executed < padded
    assert train_step_flops(cfg, caps, imgs) == 3 * useful
