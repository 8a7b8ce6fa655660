"""Sampling a rectified flow: Euler and midpoint over a shifted time grid, with classifier-free
guidance, CFG renormalisation and CFG truncation. t = 0 is noise, t = 1 is data (train/flow.py).

Definitions (the original Lumina-Image 2.0 code and diffusers differ; both are offered):
- guidance:      v = v_u + w (v_c - v_u), v_c / v_u the conditional / unconditional velocities.
- renormalisation (renorm_cfg = r > 0, the original's `renorm_cfg`): per sample, if
      ||v|| > r ||v_c||   then   v <- v * r ||v_c|| / ||v||
  (L2 norms over all non-batch dims). r = 1 caps the guided velocity at the conditional one's
  norm; r = 0 turns renormalisation off.
- truncation, cfg_trunc = c in [0, 1]: guidance is applied only on steps where the condition holds;
  other steps use v_c alone and skip the unconditional forward pass.
    mode "time" (the original code): guide while the step's time value t_i < c. Since t_i is the
        SHIFTED time, c = 1 guides every step, and the cut depends on the shift.
    mode "step" (diffusers' cfg_trunc_ratio): guide while the step fraction i / N <= c,
        independent of the time shift.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from train.flow import time_shift

VelocityFn = Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor]  # (x, t (B,), conditional) -> v


def time_grid(steps: int, mu: float | None = None, device="cpu") -> torch.Tensor:
    """steps+1 times from 0 (noise) to 1 (data), shifted toward noise by mu."""
    t = torch.linspace(0.0, 1.0, steps + 1, device=device, dtype=torch.float64)
    return (t if mu is None else time_shift(t, mu)).float()


def renormalise(v: torch.Tensor, v_cond: torch.Tensor, r: float) -> torch.Tensor:
    if r <= 0:
        return v
    dims = tuple(range(1, v.dim()))
    cap = torch.linalg.vector_norm(v_cond, dim=dims, keepdim=True) * r
    norm = torch.linalg.vector_norm(v, dim=dims, keepdim=True)
    return torch.where(norm > cap, v * (cap / norm.clamp_min(1e-12)), v)


def guidance_on(step: int, steps: int, t: float, cfg_trunc: float, mode: str) -> bool:
    if mode == "time":
        return t < cfg_trunc
    if mode == "step":
        return step / steps <= cfg_trunc
    raise ValueError(f"cfg truncation mode must be 'time' or 'step', not {mode!r}")


def guided_velocity(fn: VelocityFn, x, t: float, *, scale: float, renorm: float, guide: bool) -> torch.Tensor:
    tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32)
    v_c = fn(x, tt, True)
    if not guide or scale == 1.0:
        return v_c
    v_u = fn(x, tt, False)
    return renormalise(v_u + scale * (v_c - v_u), v_c, renorm)


@torch.no_grad()
def sample(
    fn: VelocityFn,
    noise: torch.Tensor,
    *,
    steps: int = 30,
    method: str = "euler",
    mu: float | None = None,
    cfg_scale: float = 4.0,
    renorm_cfg: float = 1.0,
    cfg_trunc: float = 1.0,
    cfg_trunc_mode: str = "time",
    on_step: Callable[[int, float, bool], None] | None = None,
) -> torch.Tensor:
    """Integrate dx/dt = v from t=0 (noise) to t=1 (data). on_step(i, t_i, guided) reports each step."""
    ts = time_grid(steps, mu).tolist()  # host-side schedule: Python floats, no device round trip
    x = noise
    for i in range(steps):
        t0, t1 = ts[i], ts[i + 1]
        guide = cfg_scale != 1.0 and guidance_on(i, steps, t0, cfg_trunc, cfg_trunc_mode)
        if on_step:
            on_step(i, t0, guide)
        v = guided_velocity(fn, x, t0, scale=cfg_scale, renorm=renorm_cfg, guide=guide)
        if method == "midpoint":
            tm = 0.5 * (t0 + t1)
            v = guided_velocity(fn, x + (tm - t0) * v, tm, scale=cfg_scale, renorm=renorm_cfg, guide=guide)
        elif method != "euler":
            raise ValueError(f"unknown sampler {method!r}: 'euler' or 'midpoint'")
        x = x + (t1 - t0) * v
    return x
