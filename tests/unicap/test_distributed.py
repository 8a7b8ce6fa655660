"""unicap.distributed: the one place that calls torch.distributed's collectives, on the group's device."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import free_port
from unicap import distributed

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("unicap", "datagen", "pipelines", "train")
HELPER = ROOT / "unicap" / "distributed.py"
COLLECTIVES = {
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "all_to_all",
    "all_to_all_single",
    "barrier",
    "monitored_barrier",
    "broadcast",
    "broadcast_object_list",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "gather",
    "gather_object",
    "scatter",
    "scatter_object_list",
    "send",
    "recv",
    "isend",
    "irecv",
    "batch_isend_irecv",
}


def collective_calls(source: str) -> list[tuple[int, str]]:
    """(line, name) of every call of a torch.distributed collective: `dist.x(...)`, `torch.distributed.x(...)`,
    and names imported from torch.distributed (any alias)."""
    tree = ast.parse(source)
    modules, names = {"torch.distributed"}, {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "torch.distributed":
                    modules.add(a.asname or a.name)
        elif isinstance(node, ast.ImportFrom) and node.module == "torch.distributed":
            for a in node.names:
                if a.name in COLLECTIVES:
                    names[a.asname or a.name] = a.name
        elif isinstance(node, ast.ImportFrom) and node.module == "torch":
            for a in node.names:
                if a.name == "distributed":
                    modules.add(a.asname or a.name)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr in COLLECTIVES and ast.unparse(f.value) in modules:
            found.append((node.lineno, f.attr))
        elif isinstance(f, ast.Name) and f.id in names:
            found.append((node.lineno, names[f.id]))
    return found


def test_the_scanner_sees_every_spelling():
    src = (
        "import torch\nimport torch.distributed as dist\nfrom torch.distributed import all_reduce as ar\n"
        "from torch import distributed\ndist.all_reduce(t)\ntorch.distributed.barrier()\nar(t)\n"
        "distributed.broadcast(t, 0)\ndist.get_rank()\n"
    )
    assert collective_calls(src) == [(5, "all_reduce"), (6, "barrier"), (7, "all_reduce"), (8, "broadcast")]


def test_only_unicap_distributed_calls_collectives():
    """Every value ranks agree on goes through one helper, which puts it on the process group's device (a CPU
    tensor in an NCCL all_reduce killed every GPU run at step 1: train/trainer.py's _all_reduce)."""
    offenders = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            if path == HELPER:
                continue
            offenders += [
                f"{path.relative_to(ROOT)}:{line} {name}" for line, name in collective_calls(path.read_text())
            ]
    assert offenders == [], offenders
    assert collective_calls(HELPER.read_text())  # the helper itself is seen by the scanner


def test_agree_without_a_process_group_keeps_order_and_reads_tensors():
    sums, flags = distributed.agree([1.5, torch.tensor(2.0), 3], flags=[False, torch.tensor(True), 0])
    assert sums == [1.5, 2.0, 3.0] and flags == [False, True, False]


def test_collective_device_is_the_ranks_gpu_under_nccl(monkeypatch):
    """Stand-in for what cannot run here (no GPU, no NCCL): the group reports the NCCL backend."""
    monkeypatch.setattr(distributed, "initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "get_backend", lambda *a: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert distributed.collective_device() == torch.device("cuda", 3)
    monkeypatch.setattr(distributed.dist, "get_backend", lambda *a: "gloo")
    assert distributed.collective_device() == torch.device("cpu")


AGREE_SCRIPT = r"""
import os, torch, torch.distributed as dist
from unicap import distributed
dist.init_process_group("gloo")
r = dist.get_rank()
seen = []
real = dist.all_reduce
def spy(t, *a, **k):
    seen.append(t.device)
    return real(t, *a, **k)
dist.all_reduce = spy
sums, flags = distributed.agree([torch.tensor(float(r + 1)), 10, r], flags=[r == 1, False, torch.tensor(r == 0)])
assert sums == [3.0, 20.0, 1.0], sums
assert flags == [True, False, True], flags
assert distributed.any_rank(r == 1) and not distributed.any_rank(False)
assert seen == [distributed.collective_device()] * 3, seen  # ONE collective per agree, on the group's device
distributed.barrier()
print("AGREE-OK", r)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_agree_adds_sums_ors_flags_in_one_collective_on_two_ranks(tmp_path):
    script = tmp_path / "agree.py"
    script.write_text(AGREE_SCRIPT)
    torchrun = str(Path(sys.executable).parent / "torchrun")
    port = str(free_port())
    cmd = [torchrun, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", port, str(script)]
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0 and r.stdout.count("AGREE-OK") == 2, (r.stdout[-2000:], r.stderr[-3000:])


EXIT_SCRIPT = r"""
import sys, threading, time
from unicap import distributed
threading.Thread(target=lambda: time.sleep(3600)).start()  # a non-daemon thread: a plain exit would wait on it
def main():
    if sys.argv[1] == "raise":
        raise RuntimeError("boom")
    return int(sys.argv[1])
sys.exit(distributed.run_main(main))
"""


def test_run_main_ends_a_failed_process_at_once(tmp_path):
    """A failure ends the process even when something would keep it alive (here a non-daemon thread; on a GPU
    rank: data-loader workers that ignore SIGTERM, an NCCL teardown)."""
    script = tmp_path / "exit.py"
    script.write_text(EXIT_SCRIPT)
    argv, env = [sys.executable, str(script), "raise"], {"PYTHONPATH": str(ROOT)}
    r = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "RuntimeError: boom" in r.stderr, r.stderr


def test_timeouts_switch_from_start_up_to_collective_and_back_around_checkpoints(monkeypatch):
    """The process groups' timeout: the start-up one until the trainer's first step, then the collective one,
    the long one again inside `patient` (checkpoints), on every group (DeepSpeed makes its own)."""
    import datetime

    import torch.distributed as dist

    from tests.conftest import free_port

    def waits() -> list[float]:
        groups = list(dist.distributed_c10d._world.pg_map)
        return [g._get_backend(torch.device("cpu")).options._timeout.total_seconds() for g in groups]

    monkeypatch.setattr(distributed, "_timeout_s", 300.0)
    if dist.is_initialized():  # a group an earlier test of this process left behind
        dist.destroy_process_group()
    init = f"tcp://127.0.0.1:{free_port()}"
    dist.init_process_group("gloo", init_method=init, rank=0, world_size=1, timeout=datetime.timedelta(seconds=300))
    try:
        dist.new_group(ranks=[0])  # as DeepSpeed's data-parallel group: torch's default timeout, not the world's
        distributed.set_timeout(300.0)
        assert waits() == [300.0, 300.0]
        distributed.set_timeout(5.0)  # after the first step
        assert waits() == [5.0, 5.0] and distributed.timeout_s() == 5.0
        with distributed.patient(300.0):
            assert waits() == [300.0, 300.0]
        assert waits() == [5.0, 5.0]
    finally:
        dist.destroy_process_group()


def test_the_stuck_report_names_the_rank_that_stopped_answering():
    import json
    import time

    import torch.distributed as dist

    store = dist.HashStore()
    beat = distributed.Heartbeat(store, rank=0, world=3)
    # stopped before the test ends: a heartbeat left running in the pytest process meets its frozen rank 1 once the
    # timeout has passed and ends this process (exit_now), tests and all (seen as a dead xdist worker)
    try:
        beat.step = 12
        far = {"host": "another-host", "pid": 1}
        store.set(beat.key(1), json.dumps({"step": 12, "t": time.time() - 60, **far}))  # frozen at step 12
        store.set(beat.key(2), json.dumps({"step": 11, "t": time.time(), **far}))  # alive, behind
        text = distributed.describe(beat, beat.peers())
    finally:
        beat.stop()
    assert not beat._thread.is_alive()
    assert "rank 1 last reached step 12; no heartbeat for 60s: it stopped answering" in text, text
    assert "rank 2 is alive but still at step 11" in text, text
    assert distributed.is_timeout(RuntimeError("[gloo] Timed out waiting 5000ms for recv operation to complete"))
