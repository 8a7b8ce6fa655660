"""Next-DiT's positional codes: multi-axis rotary embeddings (RoPE over (axis0, row, col)) and the optional
sin-cos frame code of each image token's place in the frame (train/model.py)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def frame_code(gh: int, gw: int, dim: int, device=None) -> torch.Tensor:
    """(gh*gw, dim) sin-cos features of each token's place in the frame, row-major: the row's and the column's
    centre as a fraction of the image, u = (r + 0.5) / gh in (0, 1), at dim/4 frequencies from pi to 32 pi each
    (features [sin, cos](u f) for rows, then for columns). Absolute and resolution-free: "the top left" is the
    same code at 4x4 and 8x8 tokens. RoPE gives a token only its offsets to others."""
    if dim % 4:
        raise ValueError(f"frame_code: dim {dim} must be a multiple of 4")
    k = torch.arange(dim // 4, device=device, dtype=torch.float32)
    f = math.pi * 32.0 ** (k / max(1, dim // 4 - 1))

    def axis(n: int) -> torch.Tensor:
        a = ((torch.arange(n, device=device, dtype=torch.float32) + 0.5) / n)[:, None] * f
        return torch.cat([a.sin(), a.cos()], dim=-1)  # (n, dim/2)

    return torch.cat([axis(gh).repeat_interleave(gw, 0), axis(gw).repeat(gh, 1)], dim=-1)


class RopeND(nn.Module):
    """Multi-axis rotary embedding: per axis a table of angles pos * theta^(-2k/d), concatenated."""

    def __init__(self, axes_dims, theta: float):
        super().__init__()
        self.axes_dims = tuple(axes_dims)
        self.theta = theta

    def forward(self, pos: torch.Tensor) -> torch.Tensor:
        """pos (B, S, 3) int -> rotations (B, S, 1, head_dim/2, 2) as [cos, sin], angles in float64."""
        angles = []
        for axis, d in enumerate(self.axes_dims):
            inv = 1.0 / (self.theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=pos.device) / d))
            angles.append(pos[..., axis : axis + 1].double() * inv)
        a = torch.cat(angles, dim=-1)
        return torch.stack([a.cos(), a.sin()], dim=-1).float()[:, :, None]


def apply_rope(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """x (B, S, H, Dh): interleaved pairs (x[2k], x[2k+1]) rotated by rot (B, S, 1, Dh/2, 2) = [cos, sin],
    i.e. the complex product (x[2k] + i x[2k+1]) * e^{i angle_k} in real arithmetic (fusable by compilers)."""
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = rot.unbind(-1)
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2).type_as(x)
