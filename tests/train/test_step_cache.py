"""The step cache (train/step_cache.py): exact where it must be (threshold 0 is the uncached sampler bit for bit),
the TeaCache rule step by step, per-branch state, evaluation counts, and the coefficients file."""

import json

import numpy as np
import pytest
import torch

from tests.train.test_model import randomised
from train import sampler
from train.model import NextDiT_configs
from train.step_cache import (
    COEFFICIENTS_FILE,
    StepCache,
    fit_coefficients,
    load_coefficients,
    save_coefficients,
)

CFG = NextDiT_configs["NextDiT_tiny"]
STEPS = 8


@pytest.fixture(scope="module")
def setup():
    model = randomised(CFG, seed=1)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(3, CFG.in_channels, 8, 8, generator=g)
    feats = {c: torch.randn(3, 6, CFG.cap_feat_dim, generator=g) for c in (True, False)}
    masks = {True: torch.arange(6)[None] < torch.tensor([[6], [2], [4]]), False: torch.ones(3, 6, dtype=torch.bool)}
    return model, noise, feats, masks


def draw(setup, cache: StepCache | None, solver="euler", steps=STEPS, **kw):
    model, noise, feats, masks = setup

    def velocity(x, t, cond):
        branch = None if cache is None else cache.branch(cond)
        return model(x, t, feats[cond], masks[cond], cache=branch)

    on_step = None if cache is None else cache.on_step
    return sampler.sample(velocity, noise, steps=steps, solver=solver, mu=0.5, on_step=on_step, **kw)


@pytest.mark.parametrize("solver", ["euler", "midpoint", "dpm++2m", "ab3"])
def test_threshold_zero_reproduces_the_uncached_sampler_bit_for_bit(setup, solver):
    reference = draw(setup, None, solver)
    for cache in (StepCache(0.0, STEPS), StepCache(0.0, STEPS, [2.0, 0.0], record=True)):  # also the recording path
        assert torch.equal(draw(setup, cache, solver), reference), solver
        assert cache.stats()["skipped"] == 0


def test_a_threshold_skips_only_between_the_first_and_the_last_step(setup):
    cache = StepCache(1e9, STEPS)  # skip wherever allowed
    computed_at = []
    model = setup[0]
    plain = model.run_layers

    def counting(*args):
        computed_at.append(cache.step)
        return plain(*args)

    model.run_layers = counting
    try:
        out = draw(setup, cache)
    finally:
        del model.run_layers
    assert computed_at == [0, 0, STEPS - 1, STEPS - 1]  # per step: the conditional, then the unconditional branch
    stats = cache.stats()
    assert stats["forwards"] == 2 * STEPS and stats["evaluations"] == 4 and stats["skipped"] == 2 * STEPS - 4
    assert stats["conditional"] == stats["unconditional"] == {"forwards": STEPS, "evaluations": 2}
    assert torch.isfinite(out).all() and not torch.equal(out, draw(setup, None))


def test_branches_keep_their_own_state(setup):
    """With truncation the unconditional branch runs on the first steps only; its cache is its own."""
    cache = StepCache(0.05, STEPS)
    draw(setup, cache, cfg_trunc=0.5, cfg_trunc_mode="step")
    cond, uncond = cache.branch(True), cache.branch(False)
    assert cond.calls == STEPS and uncond.calls == STEPS // 2 + 1  # i / N <= 0.5
    assert cond.residual is not uncond.residual and not torch.equal(cond.residual, uncond.residual)


def test_the_layout_is_computed_once_per_branch(setup):
    model = setup[0]
    plain, calls = model.layout, []
    model.layout = lambda *a: calls.append(1) or plain(*a)
    try:
        draw(setup, StepCache(0.0, STEPS))
        assert len(calls) == 2  # conditional and unconditional, once each for the whole run
        draw(setup, None)
        assert len(calls) == 2 + 2 * STEPS  # without a cache: every forward
    finally:
        del model.layout


class FakeModel:
    """layers[0].modulated_input(h) = h and a stack that doubles h: the rule's arithmetic in plain numbers."""

    def __init__(self):
        self.layers = [self]
        self.runs = 0

    def modulated_input(self, h, adaln):
        return h

    def run_layers(self, h, seqs, rot, adaln):
        self.runs += 1
        return 2 * h


class Lay:
    seqs = rot = None


def test_the_rule_accumulates_rescaled_changes_against_the_threshold():
    model, cache = FakeModel(), StepCache(0.25, steps=6)  # identity rescaling
    branch = cache.branch(True)
    h = torch.ones(4)
    outs = []
    for step, scale in enumerate([1.0, 1.1, 1.21, 1.331, 1.4641, 1.61051]):  # +10% each step
        cache.on_step(step, 0.0, True)
        outs.append(branch.run_layers(model, h * scale, Lay, None))
    # step 0 computed; steps 1, 2 accumulate 0.1, 0.2 (< 0.25: skipped); step 3 reaches 0.3: computed, reset;
    # step 4 skipped (0.1); step 5 is the last: computed
    assert model.runs == 3 and branch.computed == 3 and branch.calls == 6
    assert torch.allclose(outs[1], 1.1 * h + 1.0 * h)  # h + the residual of step 0 (2h - h = h)
    assert torch.allclose(outs[3], 2 * 1.331 * h) and torch.allclose(outs[4], 1.4641 * h + 1.331 * h)
    assert torch.allclose(outs[5], 2 * 1.61051 * h)
    # a polynomial that doubles the change: 0.2 (skipped), 0.4 (computed, reset), 0.2 (skipped)
    model, cache = FakeModel(), StepCache(0.25, steps=6, coefficients=[2.0, 0.0])
    for step, scale in enumerate([1.0, 1.1, 1.21, 1.331]):
        cache.on_step(step, 0.0, True)
        cache.branch(True).run_layers(model, h * scale, Lay, None)
    assert model.runs == 2


def test_a_negative_threshold_is_refused():
    with pytest.raises(ValueError, match="cache threshold must be >= 0"):
        StepCache(-0.1, 10)


def test_fit_recovers_a_known_polynomial_and_the_file_round_trips(tmp_path):
    x = np.linspace(0.01, 0.5, 40)
    truth = [3.0, -2.0, 0.7, 0.05]  # highest power first
    coefficients, fit = fit_coefficients(list(zip(x, np.polyval(truth, x), strict=True)), degree=3)
    assert np.allclose(coefficients, truth, atol=1e-8) and fit["r2"] == pytest.approx(1.0) and fit["pairs"] == 40
    assert load_coefficients(tmp_path) is None  # never calibrated
    save_coefficients(tmp_path, coefficients, {"degree": 3, "fit": fit})
    assert load_coefficients(tmp_path) == coefficients
    (tmp_path / COEFFICIENTS_FILE).write_text(json.dumps({"version": 99, "coefficients": [1.0]}))
    with pytest.raises(ValueError, match="calibrate-cache"):
        load_coefficients(tmp_path)
    with pytest.raises(ValueError, match="cannot fit"):
        fit_coefficients([(0.1, 0.2)] * 3, degree=4)


def test_calibration_records_pairs_of_consecutive_forwards(setup):
    cache = StepCache(0.0, STEPS, record=True)
    draw(setup, cache)
    assert len(cache.records) == 2 * (STEPS - 1)  # per branch: every forward after the first
    assert all(x > 0 and y > 0 for x, y in cache.records)
