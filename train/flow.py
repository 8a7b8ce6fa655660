"""Rectified flow as in Lumina-Image 2.0: the objective, the time distribution and the time shift.

Convention (the paper's): t = 0 is noise x0 ~ N(0, I), t = 1 is data x1.
    x_t = t * x1 + (1 - t) * x0          target velocity  v = x1 - x0
Resolution-dependent shift: with noise level s = 1 - t and shift factor e^mu,
    s' = e^mu s / (e^mu s + (1 - s))       (SD3 / FLUX form; mu grows with the image token count)
i.e. t' = 1 - s'. mu is linear in the number of image tokens, from BASE_SHIFT at 256 tokens
(256 px with an 8x VAE and patch 2) to MAX_SHIFT at 4096 tokens (1024 px): larger images spend
more of training and sampling at high noise.
"""

from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F

BASE_SEQ, BASE_SHIFT = 256, 0.5
MAX_SEQ, MAX_SHIFT = 4096, 1.15


def shift_mu(num_image_tokens: int) -> float:
    slope = (MAX_SHIFT - BASE_SHIFT) / (MAX_SEQ - BASE_SEQ)
    return BASE_SHIFT + slope * (num_image_tokens - BASE_SEQ)


def time_shift(t: torch.Tensor, mu: float) -> torch.Tensor:
    """Shift times toward noise by factor e^mu (t = 1 data). t=0 and t=1 are fixed points."""
    s = 1.0 - t
    shift = math.exp(mu)
    return 1.0 - shift * s / (shift * s + (1.0 - s))


def sample_t(
    n: int,
    *,
    dist: str = "logit_normal",
    loc: float = 0.0,
    scale: float = 1.0,
    mu: float | None = None,
    generator: torch.Generator | None = None,
    device="cpu",
) -> torch.Tensor:
    """Training times in (0, 1): logit-normal (sigmoid of N(loc, scale)) or uniform, then shifted by mu."""
    if dist == "logit_normal":
        t = torch.sigmoid(loc + scale * torch.randn(n, generator=generator, device=device))
    elif dist == "uniform":
        t = torch.rand(n, generator=generator, device=device)
    else:
        raise ValueError(f"unknown time distribution {dist!r}")
    return t if mu is None else time_shift(t, mu)


def interpolate(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, target velocity) for a batch; t (B,) broadcast over the other dims."""
    tb = t.view(-1, *([1] * (x1.dim() - 1))).to(x1.dtype)
    return tb * x1 + (1 - tb) * x0, x1 - x0


def flow_loss(v_pred, v_target, lowres_weight: float = 0.0, lowres_factor: int = 4) -> torch.Tensor:
    """Mean squared velocity error, averaged per sample then over the batch (works for lists of
    differently sized latents). With lowres_weight > 0, adds the same loss on lowres_factor x
    average-pooled velocities: an auxiliary signal on the coarse layout of the image."""
    preds = v_pred if isinstance(v_pred, list | tuple) else list(v_pred)
    targets = v_target if isinstance(v_target, list | tuple) else list(v_target)
    losses = []
    for p, y in zip(preds, targets, strict=True):
        loss = F.mse_loss(p.float(), y.float())
        if lowres_weight > 0 and min(p.shape[-2:]) >= lowres_factor:
            loss = loss + lowres_weight * F.mse_loss(
                F.avg_pool2d(p.float()[None], lowres_factor), F.avg_pool2d(y.float()[None], lowres_factor)
            )
        losses.append(loss)
    return torch.stack(losses).mean()


def drop_captions(captions: list[str], p: float = 0.1, rng: random.Random | None = None) -> list[str]:
    """Replace each caption by "" with probability p (classifier-free guidance training)."""
    rng = rng or random
    return ["" if rng.random() < p else c for c in captions]
