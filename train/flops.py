"""Matmul FLOPs of one Next-DiT forward, counted from the config and the sequence lengths.

Counts what the model does for the valid tokens (no padding): every linear (2*m*n*k) and the two
attention products (QK^T and AV: 4 * n^2 * head_dim per head for a sequence of n tokens). Norms,
RoPE and activations are not matmuls and are left out, as in the usual MFU accounting (PaLM,
Megatron). A training step costs 3x the forward (backward = 2x); activation recomputation is not
useful work and is not counted. tests/train/test_flops.py checks this against torch's FlopCounterMode.
"""

from __future__ import annotations

from train.model import NextDiTConfig


def block_flops(cfg: NextDiTConfig, lens: list[int], modulated: bool) -> int:
    """One JointBlock over sequences of the given lengths."""
    D, Dh, H, Hkv, T = cfg.dim, cfg.head_dim, cfg.n_heads, cfg.n_kv_heads, sum(lens)
    linear = 2 * T * D * (H + 2 * Hkv) * Dh + 2 * T * H * Dh * D + 3 * 2 * T * D * cfg.ffn_dim
    attention = sum(4 * H * Dh * n * n for n in lens)
    adaln = 2 * len(lens) * min(D, 1024) * 4 * D if modulated else 0
    return linear + attention + adaln


def forward_flops(cfg: NextDiTConfig, cap_lens: list[int], img_lens: list[int]) -> int:
    """One forward over B samples: caption i has cap_lens[i] tokens, image i img_lens[i] patches."""
    assert len(cap_lens) == len(img_lens)
    B, D, Dt = len(cap_lens), cfg.dim, min(cfg.dim, 1024)
    joint = [c + n for c, n in zip(cap_lens, img_lens, strict=True)]
    flops = B * (2 * 256 * Dt + 2 * Dt * Dt)  # t_embedder
    flops += 2 * sum(cap_lens) * cfg.cap_feat_dim * D  # cap_embedder
    flops += 2 * sum(img_lens) * cfg.patch_size**2 * cfg.in_channels * D  # x_embedder
    flops += cfg.n_refiner_layers * (block_flops(cfg, cap_lens, False) + block_flops(cfg, img_lens, True))
    flops += cfg.n_layers * block_flops(cfg, joint, True)
    flops += B * 2 * Dt * D + 2 * sum(joint) * D * cfg.patch_size**2 * cfg.in_channels  # final layer
    return flops


def train_step_flops(cfg: NextDiTConfig, cap_lens: list[int], img_lens: list[int]) -> int:
    return 3 * forward_flops(cfg, cap_lens, img_lens)
