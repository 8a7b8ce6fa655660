"""Sampling a rectified flow: a registry of ODE solvers over a shifted time grid, with classifier-free guidance,
CFG renormalisation and CFG truncation. t = 0 is noise, t = 1 is data (train/flow.py).

Solvers (SOLVERS; each step moves x from t0 to t1 = the next time of the grid, h = t1 - t0):
    euler      x + h v(x, t0)                                                order 1, 1 velocity per step
    midpoint   x + h v(x + h/2 v, t0 + h/2)                                  order 2, 2 per step
    ab2, ab3   Adams-Bashforth on the velocity: x + h sum_j w_j v_{n-j}, the weights those of the polynomial
               through the last 2 (3) velocities integrated over [t0, t1] (variable steps: the shifted grid is
               not uniform); the first steps use the lower orders they have history for, ab3 starting with one
               midpoint step (+1 velocity per run).                                   order 2 (3), 1 per step
    dpm++2m    Flow-DPM-Solver (DPM-Solver++(2M) on the flow): the data prediction D = x + (1 - t) v, exact
               integration of the linear part, D linear in lambda = log(t / (1 - t)):
                   x1 = (s1/s0) x + (1 - s1/s0) D',  s = 1 - t,  D' = D_n + (D_n - D_{n-1}) / (2 r),
                   r = (lambda_n - lambda_{n-1}) / (lambda_{n+1} - lambda_n).
               First order (D' = D_n, which is exactly the Euler step) where lambda is infinite: the step after
               t = 0 and the last step to t = 1 (which lands on D_n).                   order 2, 1 per step
A multistep solver's history is dropped when CFG truncation switches guidance off: the velocity field changes
there, and extrapolating across the switch would mix the two.

Guidance (the original Lumina-Image 2.0 code and diffusers differ; both are offered):
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

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from train.flow import time_shift

VelocityFn = Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor]  # (x, t (B,), conditional) -> v
Velocity = Callable[[torch.Tensor, float], torch.Tensor]  # (x, t) -> the guided velocity of one step
History = list[tuple[float, torch.Tensor]]  # (t, v or D) of the previous steps, oldest first


def time_grid(steps: int, mu: float | None = None, device="cpu") -> torch.Tensor:
    """steps+1 times from 0 (noise) to 1 (data), shifted toward noise by mu."""
    t = torch.linspace(0.0, 1.0, steps + 1, device=device, dtype=torch.float64)
    return (t if mu is None else time_shift(t, mu)).float()


# ---------------------------------------------------------------- solvers: (velocity, x, t0, t1, history) -> x1


def euler_step(velocity: Velocity, x, t0: float, t1: float, history: History) -> torch.Tensor:
    return x + (t1 - t0) * velocity(x, t0)


def midpoint_step(velocity: Velocity, x, t0: float, t1: float, history: History) -> torch.Tensor:
    v = velocity(x, t0)
    tm = 0.5 * (t0 + t1)
    return x + (t1 - t0) * velocity(x + (tm - t0) * v, tm)


def adams_bashforth_weights(nodes: list[float], t0: float, t1: float) -> list[float]:
    """w_j = the integral over [t0, t1] of the Lagrange basis polynomial of node j (nodes: times of the known
    velocities, any spacing). sum_j w_j v_j integrates the polynomial through (nodes, v) exactly."""
    shifted = [n - t0 for n in nodes]  # centred on t0 for conditioning
    weights = []
    for j, tj in enumerate(shifted):
        others = [tm for m, tm in enumerate(shifted) if m != j]
        basis = np.poly1d(np.poly(others)) / math.prod(tj - tm for tm in others)
        integral = basis.integ()
        weights.append(float(integral(t1 - t0) - integral(0.0)))
    return weights


def adams_bashforth(order: int):
    """AB-`order` with the lower orders while the history is short. The first step is Euler for order <= 2 and
    the midpoint step (one more velocity) above: an Euler start's O(h^2) error would cap the global order at 2."""

    def step(velocity: Velocity, x, t0: float, t1: float, history: History) -> torch.Tensor:
        history.append((t0, velocity(x, t0)))
        del history[:-order]
        if len(history) == 1:
            v = history[0][1]
            if order <= 2:
                return x + (t1 - t0) * v  # the first step: Euler, as euler_step writes it
            tm = 0.5 * (t0 + t1)
            return x + (t1 - t0) * velocity(x + (tm - t0) * v, tm)
        weights = adams_bashforth_weights([t for t, _ in history], t0, t1)
        return x + sum(w * v for w, (_, v) in zip(weights, history, strict=True))

    return step


def _log_snr(t: float) -> float:
    """lambda = log(alpha / sigma) = log(t / (1 - t)) on the flow x_t = t x1 + (1 - t) x0; -inf at 0, inf at 1."""
    if t <= 0.0:
        return -math.inf
    return math.inf if t >= 1.0 else math.log(t / (1.0 - t))


def dpm_solver_2m_step(velocity: Velocity, x, t0: float, t1: float, history: History) -> torch.Tensor:
    d = x + (1.0 - t0) * velocity(x, t0)  # data prediction (x1 estimate)
    history.append((t0, d))
    del history[:-2]
    if t1 >= 1.0:
        return d
    ratio = (1.0 - t1) / (1.0 - t0)  # sigma1 / sigma0
    if len(history) == 2:
        lam_prev, lam0, lam1 = (_log_snr(t) for t in (history[0][0], t0, t1))
        if math.isfinite(lam_prev):
            r = (lam0 - lam_prev) / (lam1 - lam0)
            d = d + (d - history[0][1]) / (2.0 * r)
    return ratio * x + (1.0 - ratio) * d


@dataclass(frozen=True)
class Solver:
    step: Callable[[Velocity, torch.Tensor, float, float, History], torch.Tensor]
    order: int  # global order of accuracy (observed on a known ODE: tests/train/test_sampler_solvers.py)
    evals_per_step: int  # velocity evaluations per step (x2 with guidance)
    min_steps: int  # fewer steps than this never reach the solver's order
    extra_evals: int = 0  # evaluations beyond steps x evals_per_step (a start-up step)

    def evaluations(self, steps: int) -> int:
        """Velocity evaluations of a run of `steps` steps (per guidance branch)."""
        return steps * self.evals_per_step + self.extra_evals


SOLVERS: dict[str, Solver] = {
    "euler": Solver(euler_step, order=1, evals_per_step=1, min_steps=1),
    "midpoint": Solver(midpoint_step, order=2, evals_per_step=2, min_steps=1),
    "ab2": Solver(adams_bashforth(2), order=2, evals_per_step=1, min_steps=2),
    "ab3": Solver(adams_bashforth(3), order=3, evals_per_step=1, min_steps=3, extra_evals=1),
    # first order after t = 0 and on the last step (3 steps are the fewest with a second-order one)
    "dpm++2m": Solver(dpm_solver_2m_step, order=2, evals_per_step=1, min_steps=2),
}


def check_settings(solver: str, steps: int, cache_threshold: float = 0.0) -> Solver:
    """The solver of a name, or a one-line ValueError for settings that cannot work."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}: one of {', '.join(SOLVERS)}")
    s = SOLVERS[solver]
    if steps < s.min_steps:
        raise ValueError(f"{solver} needs at least {s.min_steps} steps (order {s.order}), got --steps {steps}")
    if not cache_threshold >= 0:  # also NaN
        raise ValueError(f"--cache-threshold must be >= 0 (0 = no cache), got {cache_threshold}")
    return s


# ---------------------------------------------------------------- guidance


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
    solver: str = "euler",
    mu: float | None = None,
    cfg_scale: float = 4.0,
    renorm_cfg: float = 1.0,
    cfg_trunc: float = 1.0,
    cfg_trunc_mode: str = "time",
    on_step: Callable[[int, float, bool], None] | None = None,
) -> torch.Tensor:
    """Integrate dx/dt = v from t=0 (noise) to t=1 (data) with SOLVERS[solver]. on_step(i, t_i, guided) reports
    each step before its velocities are evaluated (train.step_cache.StepCache.on_step takes it)."""
    method = check_settings(solver, steps)
    ts = time_grid(steps, mu).tolist()  # host-side schedule: Python floats, no device round trip
    x, history, guided_before = noise, [], None
    for i in range(steps):
        t0, t1 = ts[i], ts[i + 1]
        guide = cfg_scale != 1.0 and guidance_on(i, steps, t0, cfg_trunc, cfg_trunc_mode)
        if on_step:
            on_step(i, t0, guide)
        if guide != guided_before:  # another velocity field from here on: no extrapolation across the switch
            history.clear()
            guided_before = guide

        def velocity(x_, t_, guide=guide):
            return guided_velocity(fn, x_, t_, scale=cfg_scale, renorm=renorm_cfg, guide=guide)

        x = method.step(velocity, x, t0, t1, history)
    return x
