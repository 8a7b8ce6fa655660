"""The solver registry of train/sampler.py: each solver's order observed on a known ODE, exactness where the
method must be exact, and the one-line refusals of settings that cannot work."""

import math

import numpy as np
import pytest
import torch

from train import sampler

A = 1.5  # dx/dt = A cos(3t) x  ->  x(1) = x(0) exp(A sin(3) / 3)
EXACT = math.exp(A * math.sin(3.0) / 3.0)


def linear_ode(x, t, cond):
    return A * torch.cos(3 * t).view(-1, 1).to(x.dtype) * x


def observed_order(solver: str, mu: float | None, steps=(16, 32, 64, 128)) -> float:
    """Minus the slope of log |error| against log steps (a least-squares line through the points)."""
    x0 = torch.ones(1, 1, dtype=torch.float64)
    errors = [
        abs(sampler.sample(linear_ode, x0, steps=n, solver=solver, mu=mu, cfg_scale=1.0).item() - EXACT) for n in steps
    ]
    return -float(np.polyfit(np.log(steps), np.log(errors), 1)[0])


@pytest.mark.parametrize("solver", list(sampler.SOLVERS))
@pytest.mark.parametrize("mu", [None, 0.8])  # the uniform grid and a shifted one (as sampling uses)
def test_each_solver_shows_its_order_on_a_linear_ode(solver, mu):
    order = sampler.SOLVERS[solver].order
    observed = observed_order(solver, mu)
    assert order - 0.3 < observed, (solver, mu, observed)
    if order == 1:
        assert observed < 1.3, observed  # and Euler really is first order: the test can tell the orders apart


def test_the_higher_orders_beat_euler_at_equal_evaluations():
    x0 = torch.ones(1, 1, dtype=torch.float64)
    err = {
        s: abs(sampler.sample(linear_ode, x0, steps=20, solver=s, mu=0.8, cfg_scale=1.0).item() - EXACT)
        for s in ("euler", "ab2", "ab3", "dpm++2m")
    }
    assert all(err[s] < err["euler"] / 1.5 for s in ("ab2", "ab3", "dpm++2m")), err


def test_adams_bashforth_weights_integrate_polynomials_exactly():
    nodes, t0, t1 = [0.1, 0.25, 0.32], 0.32, 0.5  # uneven spacing, as on the shifted grid
    weights = sampler.adams_bashforth_weights(nodes, t0, t1)
    for coeffs in ([1.0], [2.0, -1.0], [3.0, 0.5, -4.0]):  # degree 0, 1, 2: exact with 3 nodes
        p = np.poly1d(coeffs)
        exact = p.integ()(t1) - p.integ()(t0)
        assert abs(sum(w * p(n) for w, n in zip(weights, nodes, strict=True)) - exact) < 1e-12
    assert sampler.adams_bashforth_weights([0.3], 0.3, 0.5) == pytest.approx([0.2])  # one node: Euler


@pytest.mark.parametrize("solver", ["euler", "midpoint", "ab2", "ab3", "dpm++2m"])
def test_exact_on_straight_paths(solver):
    """The ideal velocity toward a fixed x1 is a straight line: every solver lands on x1."""
    x1 = torch.randn(2, 3, 4, 4, dtype=torch.float64)

    def fn(x, t, cond):
        return (x1 - x) / (1 - t).view(-1, 1, 1, 1).to(x.dtype).clamp_min(1e-9)

    out = sampler.sample(fn, torch.randn_like(x1), steps=7, solver=solver, mu=1.0, cfg_scale=1.0)
    torch.testing.assert_close(out, x1, rtol=1e-5, atol=1e-5)  # the time grid is float32


def test_evaluations_per_run_are_what_the_registry_says():
    calls = []

    def fn(x, t, cond):
        calls.append(cond)
        return torch.zeros_like(x)

    for name, s in sampler.SOLVERS.items():
        calls.clear()
        sampler.sample(fn, torch.zeros(1, 2), steps=6, solver=name, cfg_scale=2.0)
        assert len(calls) == 2 * s.evaluations(6), name  # guided: two branches per velocity


def test_multistep_history_restarts_where_guidance_is_cut():
    """Under CFG truncation the field changes at the cut: ab2's step after it is an Euler step of the new field
    (extrapolating from the guided velocities would give 3 x 0.25 x 2 + 0.25 x 0.5 = 1.625)."""

    def fn(x, t, cond):
        return torch.full_like(x, 1.0 if cond else 0.0)  # guided (w = 2): 0 + 2 (1 - 0) = 2; conditional: 1

    kw = dict(steps=4, cfg_scale=2.0, renorm_cfg=0.0, cfg_trunc=0.5, cfg_trunc_mode="step")
    out = sampler.sample(fn, torch.zeros(1, 1), solver="ab2", **kw)
    assert out.item() == pytest.approx(3 * 0.25 * 2.0 + 0.25 * 1.0)  # guided at i/N = 0, .25, .5


@pytest.mark.parametrize(
    "solver, steps, threshold, message",
    [
        ("rk45", 10, 0.0, "unknown solver 'rk45'"),
        ("ab3", 2, 0.0, "ab3 needs at least 3 steps"),
        ("ab2", 1, 0.0, "ab2 needs at least 2 steps"),
        ("euler", 0, 0.0, "euler needs at least 1 steps"),
        ("euler", 10, -0.1, "--cache-threshold must be >= 0"),
        ("euler", 10, float("nan"), "--cache-threshold must be >= 0"),
    ],
)
def test_bad_settings_are_one_line_errors(solver, steps, threshold, message):
    with pytest.raises(ValueError) as e:
        sampler.check_settings(solver, steps, threshold)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_sample_refuses_an_unknown_solver_before_any_evaluation():
    calls = []
    with pytest.raises(ValueError, match="unknown solver"):
        sampler.sample(lambda x, t, c: calls.append(1) or x, torch.zeros(1, 1), steps=3, solver="heun")
    assert calls == []
