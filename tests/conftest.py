"""Shared fixtures: a real local Ray instance and a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    proc = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(root)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
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
