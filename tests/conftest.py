"""Shared fixtures: a real local Ray instance and a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports on 127.0.0.1: every socket stays bound until all are chosen (ports chosen one at a
    time can repeat, since the kernel may hand a just-closed port out again)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray instance for the session (more logical CPUs than cores: see ENVIRONMENT.md)."""
    import ray

    from unicap.runtime import init_ray

    init_ray(quiet=True)
    yield ray
    ray.shutdown()


@pytest.fixture
def http_server(tmp_path_factory):
    """Start `python -m http.server` on 127.0.0.1 serving a fresh folder; yields (root, base_url)."""
    root = tmp_path_factory.mktemp("www")
    port = free_port()
    serve = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(root)]
    proc = subprocess.Popen(serve, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        raise RuntimeError("http.server did not start")
    yield Path(root), f"http://127.0.0.1:{port}"
    proc.kill()
    proc.wait()


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    """path -> (inode, mtime_ns) of every file: equal snapshots mean nothing was rewritten."""
    return {
        str(p.relative_to(directory)): (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


# a Ray head's agent and server ports: RayHead gives each a free port, so that two heads on one machine do not collide
RAY_AGENT_PORTS = (
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "metrics-export-port",
    "runtime-env-agent-port",
    "node-manager-port",
    "object-manager-port",
    "ray-client-server-port",
)


class RayHead:
    """`ray start --head` on 127.0.0.1 in its own session and temp dir; stopped by killing the processes of that
    session and temp dir by their ids (never `ray stop`, which would stop every Ray on the machine)."""

    def __init__(self, env: dict[str, str]):
        for attempt in range(3):  # a chosen port can be taken by another process before Ray binds it: choose again
            out = self.start(env)
            if out is None:
                return
            if "port" not in out.lower() or attempt == 2:
                raise RuntimeError(f"ray start failed: {out[-3000:]}")

    def start(self, env: dict[str, str]) -> str | None:
        """One `ray start --head` on fresh ports; None once it is up, else its output (after stopping what it left)."""
        BIN = Path(sys.executable).parent  # noqa: N806 - the venv's bin, where `ray` lives
        self.temp = tempfile.mkdtemp(prefix="rr", dir="/tmp")  # short: Ray's socket paths are length-limited
        self.dashboard, gcs, *ports = free_ports(2 + len(RAY_AGENT_PORTS))
        agents = [f"--{name}={port}" for name, port in zip(RAY_AGENT_PORTS, ports, strict=True)]
        head = ["--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=4"]
        dashboard = ["--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard}", "--include-dashboard=true"]
        local = [f"--temp-dir={self.temp}", "--disable-usage-stats"]
        cmd = [str(BIN / "ray"), "start", *head, *dashboard, *local, *agents]
        proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        self.session = proc.pid  # every process `ray start` spawns stays in this session
        out, _ = proc.communicate(timeout=180)
        if proc.returncode == 0:
            return None
        self.stop()
        return out

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard}"

    def stop(self) -> None:
        import psutil

        from tests.pipelines.conftest import kill_all

        mine = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                if os.getsid(p.pid) == self.session or any(self.temp in c for c in p.info["cmdline"] or []):
                    mine.append(p)
            except (psutil.Error, ProcessLookupError, PermissionError):
                pass
        kill_all(mine)
        shutil.rmtree(self.temp, ignore_errors=True)


# The files whose tests take longest (seconds, serial, 2 cores, pytest --durations on 2026-12-07): run first, so that
# `make test PYTEST_WORKERS=2`'s workers (pytest-xdist, --dist loadfile: a file's tests and module fixtures stay on
# one worker) start the long runs at once and share the short ones at the end (longest-first scheduling), instead of
# one worker meeting the quick demo last. A file not listed keeps its place after these, in collection order.
LONGEST_FIRST = {
    "tests/pipelines/test_demo.py": 449,
    "tests/test_readme.py": 214,
    "tests/train/test_trainer.py": 200,
    "tests/pipelines/test_bucket_cluster.py": 147,
    "tests/pipelines/test_gpu_check.py": 128,
    "tests/pipelines/test_caption.py": 100,
    "tests/train/captioner/test_tiny.py": 94,
    "tests/pipelines/test_caption_remote_model.py": 65,
    "tests/bench/test_benches.py": 52,
    "tests/train/captioner/test_trainer.py": 51,
    "tests/train/captioner/test_store.py": 49,
    "tests/train/test_rank_failure.py": 45,
    "tests/train/test_overfit_and_sample.py": 35,
    "tests/train/test_devices.py": 34,
    "tests/train/test_run_store.py": 28,
    "tests/pipelines/test_ray_job_submit.py": 32,
    "tests/pipelines/test_score.py": 27,
}


def longest_first(items: list) -> None:
    def cost(item) -> int:
        return -LONGEST_FIRST.get(item.nodeid.split("::", 1)[0], 0)

    items.sort(key=cost)  # stable: each file's tests, and the unlisted files, keep their order


def pytest_collection_modifyitems(config, items):
    """The longest files first (LONGEST_FIRST); `gpu`-marked tests need CUDA: skipped with a reason where there is
    none (CI), run by make gpu-check."""
    import torch

    if os.environ.get("PYTEST_XDIST_WORKER"):  # one process runs them in collection order, as CI always has
        longest_first(items)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run by make gpu-check on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def check_data(tmp_path_factory) -> Path:
    """make gpu-check's packed stage at 64 px, prepared with Ray (as `make gpu-bundle` does), shared by these tests."""
    data = tmp_path_factory.mktemp("gpu_check") / "data"
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "pipelines.gpu_check", "--prepare", "--data", str(data), "--resolution", "64"]
    subprocess.run(cmd, cwd=root, check=True, capture_output=True, timeout=600)
    return data
