"""Reusing computation across sampling steps of Next-DiT: the TeaCache rule on the joint block stack.

Per guidance branch (conditional / unconditional, each with its own state), on every forward:
    m_k   = layers[0].modulated_input(h_k, adaln_k)       the first block's timestep-modulated input (B, S, D)
    d_k   = mean|m_k - m_{k-1}| / mean|m_{k-1}|           its relative L1 change since the previous forward
    acc  += poly(d_k)                                      rescaled by the weights' calibrated polynomial
    acc <  threshold:  h_out = h_k + r                     the stack skipped: the residual r of the last computed
                                                           stack reused
    else:              h_out = layers(h_k), r = h_out - h_k, acc = 0
The first and the last sampling step are always computed; threshold 0 computes every step, and then the sampler's
result is bit for bit the uncached one (tested). Whatever the threshold, the t-independent part of a forward (the
context-refined caption, positions, rotations: NextDiT.layout) is computed once per branch and reused, which
changes no bit either. The decision is one per forward for the whole batch (the means run over the batch), as in
TeaCache.

The polynomial maps the input change d to the relative L1 change of the stack's residual between consecutive
forwards, fitted per weights folder by `unicap calibrate-cache` (train/calibrate_cache.py) and stored beside the
weights as teacache.json: a 2.6B model's coefficients are not a 1.9M one's. Without coefficients the rescaling is
the identity (d itself), for tests and random models; the commands refuse a threshold without a calibration.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from unicap.atomic import atomic_path

COEFFICIENTS_FILE = "teacache.json"
VERSION = 1


def relative_l1(new: torch.Tensor, old: torch.Tensor) -> float:
    """mean|new - old| / mean|old| over every element (padding is 0 in both: it changes neither sum)."""
    return ((new - old).abs().float().mean() / old.abs().float().mean().clamp_min(1e-12)).item()


class BranchCache:
    """One guidance branch's cache; NextDiT.forward takes it as `cache`."""

    def __init__(self, owner: StepCache):
        self.owner = owner
        self.calls = self.computed = 0
        self.accumulated = 0.0
        self.previous_input: torch.Tensor | None = None
        self.residual: torch.Tensor | None = None
        self._memo_key: tuple | None = None
        self._memo_value = None

    def memo(self, key: tuple, compute: Callable):
        """compute() once for a key: tensors compared by identity (the same objects as last step), the rest by ==."""
        old = self._memo_key
        same = old is not None and len(old) == len(key)
        same = same and all(a is b if isinstance(a, torch.Tensor) else a == b for a, b in zip(old, key, strict=True))
        if not same:
            self._memo_key, self._memo_value = key, compute()
        return self._memo_value

    def run_layers(self, model, h: torch.Tensor, lay, adaln: torch.Tensor) -> torch.Tensor:
        """The block stack on h (B, S, D), or h plus the cached residual (module doc)."""
        owner = self.owner
        self.calls += 1
        if owner.threshold <= 0 and owner.records is None:  # nothing to decide or record: the plain stack
            self.computed += 1
            return model.run_layers(h, lay.seqs, lay.rot, adaln)
        modulated = model.layers[0].modulated_input(h, adaln)
        first = self.previous_input is None or self.previous_input.shape != modulated.shape
        change = None if first else relative_l1(modulated, self.previous_input)
        self.previous_input = modulated
        forced = first or self.residual is None or owner.step in (0, owner.steps - 1)
        if change is not None:
            self.accumulated += owner.rescale(change)
        if not forced and self.accumulated < owner.threshold:
            return h + self.residual
        self.accumulated = 0.0
        self.computed += 1
        out = model.run_layers(h, lay.seqs, lay.rot, adaln)
        residual = out - h
        if owner.records is not None and change is not None and self.residual is not None:
            owner.records.append((change, relative_l1(residual, self.residual)))
        self.residual = residual
        return out


class StepCache:
    """The step cache of one sampling run (one batch): a BranchCache per guidance branch, the step counter the
    sampler advances (pass `on_step` to train.sampler.sample), and the evaluation counters.

    threshold: 0 computes every step (exact); coefficients: the rescaling polynomial, highest power first
    (numpy.polyval's order), None for the identity; steps: the run's number of steps (the last one is always
    computed); record: keep (input change, residual change) pairs of consecutive computed forwards in .records
    (calibration; use with threshold 0)."""

    def __init__(self, threshold: float, steps: int, coefficients: list[float] | None = None, record: bool = False):
        if not threshold >= 0:
            raise ValueError(f"cache threshold must be >= 0 (0 = no cache), got {threshold}")
        self.threshold = float(threshold)
        self.steps = steps
        self.coefficients = None if coefficients is None else [float(c) for c in coefficients]
        self.records: list[tuple[float, float]] | None = [] if record else None
        self.step = 0
        self.branches = {True: BranchCache(self), False: BranchCache(self)}

    def rescale(self, change: float) -> float:
        if self.coefficients is None:
            return change
        return max(0.0, float(np.polyval(self.coefficients, change)))  # a fitted polynomial may dip below 0

    def on_step(self, i: int, t: float, guided: bool) -> None:
        self.step = i

    def branch(self, conditional: bool) -> BranchCache:
        return self.branches[bool(conditional)]

    def stats(self) -> dict:
        """Forwards and block-stack evaluations per branch and in all (each forward draws every image of the batch
        once: these are also the counts per image)."""
        cond, uncond = self.branches[True], self.branches[False]
        return {
            "forwards": cond.calls + uncond.calls,
            "evaluations": cond.computed + uncond.computed,  # forwards whose block stack ran
            "skipped": cond.calls + uncond.calls - cond.computed - uncond.computed,
            "conditional": {"forwards": cond.calls, "evaluations": cond.computed},
            "unconditional": {"forwards": uncond.calls, "evaluations": uncond.computed},
        }


# ---------------------------------------------------------------- coefficients beside the weights


def fit_coefficients(records: list[tuple[float, float]], degree: int = 4) -> tuple[list[float], dict]:
    """A least-squares polynomial residual change ~ input change; (coefficients, fit quality)."""
    if len(records) <= degree:
        raise ValueError(f"calibration: {len(records)} (input, residual) pairs cannot fit a degree-{degree} polynomial")
    x, y = (np.asarray(v, dtype=np.float64) for v in zip(*records, strict=True))
    coefficients = np.polyfit(x, y, degree)
    pred = np.polyval(coefficients, x)
    r2 = 1.0 - float(np.sum((y - pred) ** 2) / max(np.sum((y - y.mean()) ** 2), 1e-30))
    fit = {"pairs": len(records), "r2": round(r2, 4), "input_change": [float(x.min()), float(x.max())]}
    return [float(c) for c in coefficients], {**fit, "residual_change": [float(y.min()), float(y.max())]}


def save_coefficients(folder: str | Path, coefficients: list[float], info: dict) -> Path:
    """FOLDER/teacache.json, written atomically."""
    path = Path(folder) / COEFFICIENTS_FILE
    data = {"version": VERSION, "coefficients": coefficients, **info}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    return path


def load_coefficients(folder: str | Path) -> list[float] | None:
    """The calibrated polynomial beside a weights folder's tensors, or None when it was never calibrated."""
    path = Path(folder) / COEFFICIENTS_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    coefficients = data.get("coefficients") if isinstance(data, dict) else None
    if data.get("version") != VERSION or not isinstance(coefficients, list) or not coefficients:
        raise ValueError(f"{path}: not a teacache.json of version {VERSION}: re-run `unicap calibrate-cache`")
    return [float(c) for c in coefficients]
