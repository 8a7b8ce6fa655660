"""make gpu-check, run here on CPU (--allow-cpu, 64 px) so that the check a GPU machine runs does not rot.

The trainer parts run where a GPU machine runs them: a bare Python (a venv holding only what a bare GPU machine has,
tools/gpu_bundle.py --bare-venv) with the bundle `make gpu-bundle` builds, made here for this Python. The project's
venv runs the env part (no bundle used where deepspeed is installed) and the mfu part's skip.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
RESOLUTION = "64"  # the check_data fixture's (tests/conftest.py)


@pytest.fixture(scope="session")
def bare_machine(tmp_path_factory) -> tuple[Path, Path]:
    """(python, wheels): a bare GPU machine's packages in a fresh venv, and the bundle built for its Python."""
    root = tmp_path_factory.mktemp("bare")
    tool = [sys.executable, "tools/gpu_bundle.py"]
    made = subprocess.run([*tool, "--bare-venv", str(root / "venv")], cwd=ROOT, check=True, capture_output=True)
    python = Path(made.stdout.decode().strip().splitlines()[-1])
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    build = subprocess.run([*tool, "--python", here, "--out", str(root / "wheels")], cwd=ROOT, capture_output=True)
    assert build.returncode == 0, build.stderr.decode()[-2000:]
    return python, root / "wheels"


def gpu_check(python: Path | str, tmp_path: Path, data: Path, *args: str) -> subprocess.CompletedProcess:
    out = ["--out", str(tmp_path / "gpu_check.json"), "--work", str(tmp_path / "work")]
    inputs = ["--data", str(data), "--resolution", RESOLUTION]
    cmd = [str(python), "-m", "pipelines.gpu_check", "--allow-cpu", *out, *inputs, *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)


def test_the_bare_venv_lacks_what_the_bundle_brings(bare_machine):
    python, wheels = bare_machine
    probe = "import importlib.util as u; print([m for m in {} if u.find_spec(m)])"
    wanted = ["torch", "transformers", "safetensors", "pyarrow", "pandas", "PIL", "tokenizers", "pytest"]
    absent = ["deepspeed", "diffusers", "ray", "vllm", "open_clip", "requests"]
    found = subprocess.run([str(python), "-c", probe.format(wanted + absent)], capture_output=True, text=True)
    assert found.stdout.strip() == repr(wanted), found
    manifest = json.loads((wheels / "bundle.json").read_text())
    # computed from metadata: deepspeed, diffusers and what diffusers' import check needs (requests, bc670f1 lacked)
    assert {"deepspeed", "diffusers", "requests", "urllib3", "idna", "certifi"} <= manifest["distributions"].keys()
    assert not {"torch", "transformers", "numpy", "nvidia-cublas-cu12"} & manifest["distributions"].keys()
    assert manifest["bytes"] < 60e6


def test_gpu_check_on_a_bare_python_with_the_bundle(bare_machine, check_data, tmp_path):
    python, wheels = bare_machine
    parts = ("env", "trainer", "zero3", "crash", "sample", "adherence", "step")
    r = gpu_check(python, tmp_path, check_data, "--wheels", str(wheels), "--parts", ",".join(parts))
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert f"using {wheels.parent / 'gpu_site'}" in r.stdout
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [res[p]["status"] for p in parts] == ["ok"] * len(parts), {p: res[p] for p in parts}
    env = res["env"]
    assert env["deepspeed"] and env["diffusers"] and not env["diffusers"].startswith("broken"), env
    assert env["ray"] is None and env["vllm"] is None and env["open_clip"] is None
    t = res["trainer"]
    assert t["steps"] == 20 and t["final_weights"] and t["diffusers_export"] and t["sample_grid"]
    assert t["sigterm_checkpoint"] and t["resumed"]
    assert res["crash"]["exit_code"] != 0 and res["crash"]["seconds_to_exit"] < 10
    assert res["sample"]["images"] == 2
    assert res["zero3"]["loss_first_last"][1] is not None
    assert res["step"]["plain_over_deepspeed_time"]["median"] > 0  # the bench ran both legs
    for part in parts:  # the table: one line per part
        assert any(line.startswith(part) for line in r.stdout.splitlines()), r.stdout


def test_gpu_check_refuses_bad_inputs_in_one_line(bare_machine, check_data, tmp_path):
    python, wheels = bare_machine
    r = gpu_check(python, tmp_path, check_data, "--wheels", str(tmp_path / "none"), "--parts", "env")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "make gpu-bundle" in r.stderr, r.stderr
    other = tmp_path / "wheels312"
    other.mkdir()
    (other / "msgpack-1.2.4-cp399-cp399-manylinux_2_28_x86_64.whl").touch()  # a Python the wheels do not fit
    r = gpu_check(python, tmp_path, check_data, "--wheels", str(other), "--parts", "env")
    assert r.returncode == 2 and "GPU_PYTHON=3." in r.stderr and r.stderr.count("\n") == 1, r.stderr
    r = gpu_check(python, tmp_path, check_data, "--wheels", str(wheels), "--parts", "env,nothing")
    assert r.returncode == 2 and "unknown part 'nothing'" in r.stderr  # a typo is refused before anything runs
    cmd = [str(python), "-m", "pipelines.gpu_check", "--allow-cpu", "--data", str(check_data), "--resolution", "256"]
    r = subprocess.run([*cmd, "--wheels", str(wheels), "--parts", "env"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "packed at 64 px, --resolution is 256" in r.stderr, r.stderr
    assert not (tmp_path / "work").exists()  # refused before any part started


def test_gpu_check_in_the_project_venv(check_data, tmp_path):
    r = gpu_check(sys.executable, tmp_path, check_data, "--parts", "env,mfu")
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert "gpu_site" not in r.stdout  # deepspeed and diffusers installed: no bundle used
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [res[p]["status"] for p in ("env", "mfu")] == ["ok", "skipped"], res
    assert res["env"]["ray"] and res["env"]["open_clip"]
