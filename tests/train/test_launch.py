"""`make stage*` -> train.launch, `unicap train-captioner` -> train.captioner.launch: both on train.launcher
(one node, several launchers, a hostfile)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

pytest_plugins = ["tests.s3_server"]
REPO = Path(__file__).resolve().parents[2]


def args(*extra: str):
    p = ["--stage", "stage2", "--config", "train/configs/stage2_cpu.yaml", "--data", "DATA", *extra]
    return p


def launch(*cli: str) -> subprocess.CompletedProcess:
    """`python -m train.launch <cli>` from the repository root."""
    return subprocess.run([sys.executable, "-m", "train.launch", *cli], capture_output=True, text=True, cwd=REPO)


def run_dry(tmp_path, *extra: str) -> str:
    r = launch("--dry-run", *args(*extra))
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_one_node_uses_torchrun_with_the_stage_paths(tmp_path):
    out = run_dry(tmp_path, "--nproc", "4", "--", "optim.lr=1e-4")
    assert "torchrun --nnodes 1 --node_rank 0 --nproc_per_node 4" in out
    assert "-m train.trainer --config train/configs/stage2_cpu.yaml run.stage=stage2" in out
    data = REPO / "DATA"  # the data folder as an absolute path (or a URI): every rank reads the same
    assert f"data.packed={data}/packed/stage2 run.out={data}/runs optim.lr=1e-4" in out
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
    r = launch(*args("--dry-run", "--", "optim.lr=fast"))
    assert r.returncode == 2 and "optim.lr" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_missing_manifest_is_a_clear_error(tmp_path):
    r = launch("--stage", "stage1", "--config", "train/configs/stage1_cpu.yaml", "--data", str(tmp_path))
    assert r.returncode == 2 and "no stage manifest" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_the_captioner_launcher_shares_the_launch_command(tmp_path):
    """`unicap train-captioner` (train.captioner.launch): the same launcher, its own trainer module and port."""

    def dry(*cli: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "train.captioner.launch", "--dry-run", *cli]
        return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)

    r = dry("--config", "train/configs/captioner_tiny.yaml", "--nproc", "2", "run.steps=900")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "torchrun --nnodes 1 --node_rank 0 --nproc_per_node 2 --master_addr 127.0.0.1" in r.stdout
    assert "-m train.captioner.trainer --config train/configs/captioner_tiny.yaml run.steps=900" in r.stdout
    r = dry("--hostfile", "hosts", "--nproc", "8")
    assert "deepspeed --hostfile hosts --num_gpus 8 --master_addr 127.0.0.1 --master_port 29510" in r.stdout
    assert r.stdout.rstrip().endswith("--module train.captioner.trainer")  # no --config: the defaults
    r = dry("optim.lr=fast")
    assert r.returncode == 2 and "optim.lr" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_launch_runs_the_command_with_this_checkout_on_pythonpath(tmp_path, monkeypatch, capfd):
    from train.launcher import launch as run_launch

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", "elsewhere")
    monkeypatch.setenv("DS_ACCELERATOR", "set-by-user")
    show = "import os; print(os.environ['PYTHONPATH'], os.environ['DS_ACCELERATOR'], os.environ['EXTRA'])"
    defaults = {"DS_ACCELERATOR": "cpu", "EXTRA": "default"}
    assert run_launch([sys.executable, "-c", show + "; raise SystemExit(3)"], dry_run=False, env_defaults=defaults) == 3
    out = capfd.readouterr().out.splitlines()
    assert out[0].startswith("[launch] ") and out[1] == f"{tmp_path}{os.pathsep}elsewhere set-by-user default"
    assert run_launch(["false"], dry_run=True) == 0  # printed, not run


def test_a_data_folder_in_a_bucket_puts_the_packed_stage_and_the_runs_there(s3):
    cli = ["--stage", "stage2", "--config", "train/configs/stage2_cpu.yaml", "--dry-run"]
    r = launch(*cli, "--data", f"{s3}/unicap")
    assert r.returncode == 0, r.stderr
    assert f"data.packed={s3}/unicap/packed/stage2 run.out={s3}/unicap/runs" in r.stdout
    missing = launch(*cli, "--data", f"{s3}-missing/unicap")
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "does not exist" in missing.stderr
