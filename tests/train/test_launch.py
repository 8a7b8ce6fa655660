"""`make stage*` -> train.launch: the launcher command for one node, several launchers, and a hostfile."""

from __future__ import annotations

import subprocess
import sys

from train import launch


def args(*extra: str):
    p = ["--stage", "stage2", "--config", "train/configs/stage2_cpu.yaml", "--data", "DATA", *extra]
    return p


def run_dry(tmp_path, *extra: str) -> str:
    r = subprocess.run([sys.executable, "-m", "train.launch", "--dry-run", *args(*extra)], capture_output=True,
                       text=True, cwd=launch.Path(__file__).resolve().parents[2])  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_one_node_uses_torchrun_with_the_stage_paths(tmp_path):
    out = run_dry(tmp_path, "--nproc", "4", "--", "optim.lr=1e-4")
    assert "torchrun --nnodes 1 --node_rank 0 --nproc_per_node 4" in out
    assert "-m train.trainer --config train/configs/stage2_cpu.yaml run.stage=stage2" in out
    assert "data.packed=DATA/packed/stage2 run.out=DATA/runs optim.lr=1e-4" in out
    # one node: a free port each time, so two runs on one machine (the demo, a make stage1) do not collide
    port = int(out.split("--master_port ")[1].split()[0])
    assert port != 29500 and 1024 < port < 65536
    assert "--master_port 29600" in run_dry(tmp_path, "--master-port", "29600")


def test_a_hostfile_uses_the_deepspeed_launcher(tmp_path):
    out = run_dry(tmp_path, "--nproc", "8", "--hostfile", "hosts", "--master-addr", "10.0.0.1")
    assert "deepspeed --hostfile hosts --num_gpus 8 --master_addr 10.0.0.1" in out
    assert "--module train.trainer --config train/configs/stage2_cpu.yaml" in out
    assert "--master_port 29500" in out  # every node must agree on it


def test_one_launcher_per_node(tmp_path):
    out = run_dry(tmp_path, "--nproc", "8", "--nnodes", "4", "--node-rank", "3", "--master-addr", "node0")
    assert "torchrun --nnodes 4 --node_rank 3 --nproc_per_node 8 --master_addr node0 --master_port 29500" in out


def test_a_bad_override_fails_before_anything_starts(tmp_path):
    r = subprocess.run([sys.executable, "-m", "train.launch", *args("--dry-run", "--", "optim.lr=fast")],
                       capture_output=True, text=True, cwd=launch.Path(__file__).resolve().parents[2])  # fmt: skip
    assert r.returncode == 2 and "optim.lr" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_missing_manifest_is_a_clear_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "train.launch", "--stage", "stage1", "--config",
                        "train/configs/stage1_cpu.yaml", "--data", str(tmp_path)],
                       capture_output=True, text=True, cwd=launch.Path(__file__).resolve().parents[2])  # fmt: skip
    assert r.returncode == 2 and "no stage manifest" in r.stderr and "Traceback" not in r.stderr, r.stderr
