"""The project's own commands as the benches run them: in the repository root with it on PYTHONPATH, each one's
output in a log; the trainer's launcher and the pixel judge (train.adherence), whose rows the benches tabulate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
ATTRS = ("background", "colour", "shape", "count", "position")  # what the pixel judge scores


def run_logged(cmd: list[str], log: Path) -> float:
    """Run CMD in the repository root with its output in LOG; its wall seconds. A failure raises, naming LOG."""
    t0 = time.time()
    with open(log, "w") as f:
        r = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=ENV)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])}... failed (exit {r.returncode}), see {log}")
    return round(time.time() - t0, 1)


def launch_cmd(stage: str, data: Path, nproc: int, overrides: Iterable[str]) -> list[str]:
    """`train.launch` of STAGE (its CPU config) on DATA's stage manifest and captions, NPROC ranks, with the
    trainer config OVERRIDES."""
    launch = ["-m", "train.launch", "--stage", stage, "--config", f"train/configs/{stage}_cpu.yaml"]
    return [sys.executable, *launch, "--data", str(data), "--nproc", str(nproc), "--", *overrides]


def adherence_rows(truth: Path, dest: Path, args: Iterable[str], log: Path) -> dict:
    """The pixel judge (train.adherence) on TRUTH's held-out prompts, writing into DEST, with ARGS (the prompts, the
    --weights to judge); its rows: {weights name: {attribute: accuracy}}."""
    run_logged([sys.executable, "-m", "train.adherence", "--truth", str(truth), "--out", str(dest), *args], log)
    return json.loads((dest / "adherence.json").read_text())["rows"]


def accuracy_cells(accs: dict) -> str:
    """One markdown table row's cells: the accuracy of each attribute, '-' where the judge could not tell."""
    return " | ".join("-" if accs[a] is None else f"{accs[a]:.2f}" for a in ATTRS)
