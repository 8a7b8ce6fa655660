"""The step cache and the solvers under the device audit (tests/device_audit; tests/train/test_devices.py says why):
`unicap calibrate-cache` and a cached multistep `unicap sample` create no tensor without a device."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.train.test_devices import findings, run
from tests.train.test_model import randomised
from train.checkpoint import save_weights
from train.model import NextDiT_configs

pytestmark = pytest.mark.slow
UNICAP = str(Path(sys.executable).with_name("unicap"))


def test_calibration_and_cached_sampling_name_every_device(tmp_path):
    folder = save_weights(tmp_path / "final", randomised(NextDiT_configs["NextDiT_tiny"]), "tiny", "tiny")
    audit = tmp_path / "audit"
    run([UNICAP, "calibrate-cache", "--ckpt", str(folder), "--size", "32x32", "--steps", "4,8"], audit)
    drawing = ["--prompt", "a red circle", "--out", str(tmp_path / "out"), "--size", "32x32"]
    for solver in ("dpm++2m", "ab3"):
        run([UNICAP, "sample", "--ckpt", str(folder), *drawing, "--solver", solver, "--cache-threshold", "0.5"], audit)
    found, processes = findings(audit)
    assert processes >= 3 and (folder / "teacache.json").is_file()
    assert found == [], "tensors created without a device:\n" + "\n".join(found)
