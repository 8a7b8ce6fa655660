"""Devices on the GPU path, proven on CPU (issue 19): no tensor of the project's is created without a device.

A tensor made without `device=` lands on the CPU; on a GPU it then meets CUDA tensors and the run dies (the
sampler's noise: `mat1 is on cpu` in the time embedder) or hands a CPU tensor to an NCCL collective (the trainer's
`_all_reduce`: `No backend type associated with device type cpu`). The CPU cannot tell the two apart, so these
tests run the real trainer (2 ranks, a sample grid, checkpoints, the diffusers export), `unicap sample` and the
real captioner trainer under the device audit (tests/device_audit): every factory call from the project's files
that names no device is recorded, and there must be none.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.train.conftest import env, trainer_cmd

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def audit_env(folder: Path) -> dict:
    base = env()
    return {
        **base,
        "UNICAP_DEVICE_AUDIT": str(folder),
        "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "device_audit"), base["PYTHONPATH"]]),
    }


def findings(folder: Path) -> tuple[list[str], int]:
    """(recorded calls, processes audited)."""
    lines = [line for f in sorted(folder.glob("*.txt")) for line in f.read_text().splitlines()]
    return sorted(set(lines)), len(list(folder.glob("*.started")))


def run(cmd: list[str], folder: Path) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, env=audit_env(folder), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-5000:])
    return r


def test_the_audit_records_a_factory_call_without_a_device(tmp_path):
    run([sys.executable, "-m", "tests.device_audit.probe"], tmp_path)
    found, processes = findings(tmp_path)
    assert processes == 1
    assert found == ["tests/device_audit/probe.py:6 zeros"], found


def test_trainer_sampling_and_checkpoints_name_every_device(packed_stage, tmp_path):
    audit = tmp_path / "audit"
    out = tmp_path / "out"
    overrides = ["run.steps=3", "run.save_every=2", "run.sample_prompts=['a red circle']", "run.sample_steps=2"]
    run(trainer_cmd(packed_stage, out, overrides), audit)
    final = out / "stage1" / "final"
    prompts = ["--prompt", "a red circle", "--prompt", "两个蓝色的正方形"]
    sample = [str(BIN / "unicap"), "sample", "--ckpt", str(final), *prompts, "--out", str(tmp_path / "samples")]
    run([*sample, "--size", "64x64", "--steps", "2"], audit)
    assert len(list((tmp_path / "samples").glob("*.png"))) == 2
    found, processes = findings(audit)
    assert processes >= 3  # two ranks and the sampler were audited
    assert found == [], "tensors created without a device:\n" + "\n".join(found)


def test_captioner_trainer_names_every_device(tmp_path):
    """The synthetic source (grounding on: its scene graphs are the targets), a grounding-only step then a full one."""
    audit = tmp_path / "audit"
    cmd = [str(BIN / "unicap"), "train-captioner", "--config", "train/configs/captioner_tiny.yaml", "--nproc", "2"]
    cmd += ["--master-port", str(free_port()), f"run.out={tmp_path / 'run'}"]
    cmd += ["data.micro_batch=2", "data.global_batch=4", "data.num_workers=0", f"data.max_pixels={112 * 112}"]
    cmd += ["data.levels=[short]", "optim.ground_first_steps=1", "optim.warmup_steps=1", "run.steps=2"]
    cmd += ["run.save_every=2", "run.max_minutes=0", "run.progress=false", "run.log_every=1", "run.threads=1"]
    cmd += ["model.export_dtype=float32", "deepspeed.precision=auto"]
    run(cmd, audit)
    found, processes = findings(audit)
    assert processes >= 2
    assert found == [], "tensors created without a device:\n" + "\n".join(found)
