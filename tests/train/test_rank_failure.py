"""A rank that fails ends the whole run at once: real torchrun, real DeepSpeed ranks (gloo on CPU).

Seen on a GPU (issue 19): after an exception the rank did not exit, torchrun waited 30 s and SIGKILLed it,
and a crashed rank held its GPU doing nothing. Each test injects one failure into a real run (the trainer's
own entry point, run with runpy) and asserts that the launcher returns non-zero within 10 s of it (torchrun's
own kill comes after 30 s) and that no rank process is left.
"""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.train.conftest import env, trainer_cmd

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
WITHIN_S = 10.0  # torchrun's own SIGTERM -> SIGKILL wait is 30 s

# The injected failures, each at a real point of the trainer (patched in the modules it calls, since runpy
# runs train.trainer afresh as __main__): `raise` at step N on one rank, `hang` (a rank
# stuck at step N, as in a collective whose peer died), `sample` (the final sample grid raising, as the sampler
# did on CUDA). Each rank writes its pid first; the failing rank writes the time it failed.
FAULT = r"""
import os, runpy, sys, time
from pathlib import Path
mode, rank_to_fail, at_step, marks = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
rank = int(os.environ["RANK"])
(marks / f"pid{rank}").write_text(str(os.getpid()))
import train.flow, train.sample
real_loss, seen = train.flow.flow_loss, [0]
def faulty_loss(*a, **k):  # once per micro-batch: once per step at accumulation 1
    seen[0] += 1
    if rank == rank_to_fail and seen[0] == at_step:
        (marks / "failed_at").write_text(repr(time.time()))
        if mode == "raise":
            raise RuntimeError(f"injected failure on rank {rank} at step {at_step}")
        if mode == "hang":
            while True:
                time.sleep(1)
        # mode "mark": only the time; the test acts on the rank (SIGSTOP)
    return real_loss(*a, **k)
def faulty_generate(*a, **k):
    (marks / "failed_at").write_text(repr(time.time()))
    raise RuntimeError("injected failure in the sample grid")
train.flow.flow_loss = faulty_loss
if mode == "sample":
    train.sample.generate = faulty_generate
sys.argv = ["train.trainer", *sys.argv[5:]]
runpy.run_module("train.trainer", run_name="__main__", alter_sys=True)
"""


def _run_with_fault(
    packed: Path, tmp: Path, mode: str, nproc: int, fail_rank: int, at_step: int, extra: list[str] = (), on_fail=None
) -> tuple[int, float, str, list[int]]:
    """Start the run, wait for the injected failure; returns (exit code, seconds from failure to the launcher's
    exit, or from the time on_fail returns, output, rank pids)."""
    script, marks = tmp / "fault.py", tmp / "marks"
    script.write_text(FAULT)
    marks.mkdir()
    cmd = trainer_cmd(packed, tmp / "out", ["run.steps=50", "run.save_every=1000", *extra], nproc=nproc)
    i = cmd.index("-m")  # torchrun ... -m train.trainer ARGS -> torchrun ... fault.py MODE RANK STEP MARKS ARGS
    cmd = [*cmd[:i], str(script), mode, str(fail_rank), str(at_step), str(marks), *cmd[i + 2 :]]
    proc = subprocess.Popen(cmd, env=env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    while not (marks / "failed_at").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    signalled = on_fail(proc) if on_fail is not None and proc.poll() is None else None
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        # the launcher's own tree only: every child of this process would include the session's Ray and S3
        # servers (fixtures of earlier tests), and a Ray driver whose raylet is killed ends this process
        with contextlib.suppress(psutil.NoSuchProcess):
            launcher = psutil.Process(proc.pid)
            for p in [*launcher.children(recursive=True), launcher]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.kill()
    ended = time.time()
    assert (marks / "failed_at").exists(), out[-4000:]
    pids = [int((marks / f"pid{r}").read_text()) for r in range(nproc) if (marks / f"pid{r}").exists()]
    since = signalled or float((marks / "failed_at").read_text())
    return proc.returncode, ended - since, out, pids


def _left_running(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def test_a_rank_that_raises_mid_run_ends_the_launcher_within_seconds(packed_stage, tmp_path):
    rc, took, out, pids = _run_with_fault(
        packed_stage, tmp_path, "raise", nproc=2, fail_rank=1, at_step=3, extra=["data.num_workers=1"]
    )  # the configs' loader workers
    assert rc != 0, out[-3000:]
    assert "injected failure on rank 1 at step 3" in out, out[-3000:]
    assert took < WITHIN_S, (took, out[-3000:])
    assert len(pids) == 2 and not _left_running(pids)


def test_a_failure_after_training_ends_a_single_rank_at_once(packed_stage, tmp_path):
    """Defect 3 as seen: one rank, the final sample grid raises after training."""
    extra = ["run.steps=2", "data.num_workers=1", "run.sample_prompts=['a red circle']"]
    rc, took, out, pids = _run_with_fault(
        packed_stage, tmp_path, "sample", nproc=1, fail_rank=0, at_step=0, extra=extra
    )
    assert rc != 0 and "injected failure in the sample grid" in out, out[-3000:]
    assert took < WITHIN_S, (took, out[-3000:])
    assert not _left_running(pids)


def test_sigterm_to_ranks_stuck_in_a_step_ends_them_after_the_grace(packed_stage, tmp_path):
    """A rank hangs (its peer then waits in a collective that never completes); SIGTERM, as a launcher sends
    when another rank died, must end both ranks after run.term_grace_s, not be swallowed by the stop handler
    (which left them to torchrun's SIGKILL, or to hang when nobody sends one)."""

    def terminate(proc) -> float:
        time.sleep(1.0)
        for child in psutil.Process(proc.pid).children():
            child.send_signal(signal.SIGTERM)
        return time.time()

    rc, took, out, pids = _run_with_fault(
        packed_stage, tmp_path, "hang", nproc=2, fail_rank=1, at_step=3, extra=["run.term_grace_s=3"], on_fail=terminate
    )
    assert rc != 0, out[-3000:]
    assert "no step boundary within 3s" in out, out[-3000:]
    assert took < WITHIN_S, (took, out[-3000:])
    assert len(pids) == 2 and not _left_running(pids)


def test_a_rank_that_stops_answering_ends_the_job_after_the_collective_timeout(packed_stage, tmp_path):
    """SIGSTOP of one rank mid-run (a hung node, a loader that never returns): the other gives up after
    run.collective_timeout_s (not gloo's 30 minutes), names the stopped rank, kills it (a stopped process ignores
    torchrun's SIGTERM), and the launcher returns non-zero; a rerun resumes from the last complete checkpoint."""
    timeout_s, pids = 5, []

    def freeze(proc) -> float:
        pids.append(int((tmp_path / "marks" / "pid1").read_text()))
        psutil.Process(pids[0]).send_signal(signal.SIGSTOP)
        return time.time()

    extra = ["run.save_every=2", f"run.collective_timeout_s={timeout_s}"]
    try:
        rc, took, out, ranks = _run_with_fault(
            packed_stage, tmp_path, "mark", nproc=2, fail_rank=1, at_step=4, extra=extra, on_fail=freeze
        )
        left = _left_running(ranks)
    finally:
        for pid in pids:  # whatever happened, nothing stays stopped
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    psutil.Process(pid).send_signal(sig)
                except psutil.NoSuchProcess:
                    pass
    print(f"SIGSTOP -> launcher exit: {took:.1f}s")
    assert rc != 0, out[-3000:]
    assert re.search(r"rank 1 (last reached step \d+|had not finished its first step); no heartbeat", out), out[-3000:]
    assert took < timeout_s + WITHIN_S, (took, out[-3000:])
    assert len(ranks) == 2 and not left, left
    from unicap.contract import checkpoint as contract

    run_dir = tmp_path / "out" / "stage1"
    assert contract.read_state(contract.latest_checkpoint(run_dir))["step"] == 2  # steps 3-4 never saved
