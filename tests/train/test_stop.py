"""train.stop.StopFlag: a signal is served at a step boundary; a rank that reaches none ends itself."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import os, signal, sys, time
from train.stop import StopFlag
with StopFlag(grace_s=1.0) as s:
    os.kill(os.getpid(), signal.SIGTERM)
    for _ in range(4):  # a boundary every 0.6 s: progress, so 2.4 s pass with a grace of 1 s
        time.sleep(0.6)
        s.answer(False)
    assert s.asked()
    s.answer(True)  # the ranks agreed to stop: served, the watchdog stands down
    time.sleep(1.5)
print("SERVED", flush=True)
assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # closed: signals act as before
with StopFlag(grace_s=1.0) as s:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(10)  # stuck: no boundary after the signal
print("NOT REACHED", flush=True)
"""


def test_progress_keeps_a_signalled_rank_alive_and_a_stuck_one_exits_after_the_grace():
    env = {"PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert "SERVED" in r.stdout and "NOT REACHED" not in r.stdout, (r.stdout, r.stderr)
    assert r.returncode == 128 + 15 and "SIGTERM and no step boundary within 1s" in r.stderr, r.stderr
