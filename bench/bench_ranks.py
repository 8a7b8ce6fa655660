"""How stage1 spends 2 cores: two ranks at micro 4 against one rank at micro 8 (the same global batch of 8).

    .venv/bin/python bench/bench_ranks.py --data demo [--rounds 3] [--steps 150]

Each leg is `make stage1`'s trainer (train/configs/stage1_cpu.yaml: the tiny Next-DiT, the tiny CLIP's text tower, the
trained tiny VAE, precision auto) on the demo's packed stage1, started by torchrun; the legs run interleaved, round
after round. Seconds per step are read from the run's metrics.jsonl (samples / samples_per_s of each step), the
median over the steps after the first 10 (warm-up); start-up (imports, DeepSpeed, codecs) is reported apart, as the
wall time of the whole run minus the steps. Results: bench/results/ranks.json (median ratio and its spread).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench._results import save, spread  # noqa: E402
from bench._runs import ENV  # noqa: E402

LEGS = {"2 ranks x micro 4": (2, {"data.micro_batch": 4}), "1 rank x micro 8": (1, {"data.micro_batch": 8})}
WARMUP = 10


def run_leg(data: Path, work: Path, ranks: int, extra: dict, steps: int) -> dict:
    """One stage1 run of `steps` on `ranks` ranks with the config overrides `extra`: its seconds per step."""
    from tests.conftest import free_port

    out = work / "leg"
    shutil.rmtree(out, ignore_errors=True)
    launcher = Path(sys.executable).parent / "torchrun"
    torchrun = [str(launcher), "--nnodes", "1", "--nproc_per_node", str(ranks)]
    rendezvous = ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    overrides = {
        "data.packed": data / "packed" / "stage1",
        "run.out": out,
        "run.steps": steps,
        "run.save_every": steps,
        "run.sample_prompts": "[]",
        "run.progress": "false",
        "run.tensorboard": "false",
        "run.log_every": 1,
        **extra,
    }
    trainer = ["-m", "train.trainer", "--config", "train/configs/stage1_cpu.yaml"]
    cmd = [*torchrun, *rendezvous, *trainer, *(f"{k}={v}" for k, v in overrides.items())]
    t0 = time.time()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=ENV)
    wall = time.time() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{ranks} ranks, {extra}: exit {r.returncode}\n{r.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "stage1" / "metrics.jsonl").read_text().splitlines()]
    per_step = [row["samples"] / row["samples_per_s"] for row in rows if row.get("samples_per_s")]
    startup = wall - sum(per_step)
    median = statistics.median(per_step[WARMUP:])
    return {
        "s_per_step": median,
        "steps": len(per_step),
        "wall_s": round(wall, 1),
        "startup_s": round(startup, 1),
    }


def parser(doc: str, name: str) -> argparse.ArgumentParser:
    """The command line of the stage1 step benches: demo data, rounds, steps, work folder, results/NAME.json."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="demo", help="a demo folder with packed/stage1 (after `make demo`)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--work", default=f"/tmp/bench_{name}")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / f"{name}.json"))
    return p


def machine() -> dict:
    """What the seconds depend on: the CPU, its cores, and the precision auto resolves to there."""
    from unicap.runtime import cpu_bf16_native, resolve_precision

    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "bf16_native": cpu_bf16_native(),
        "precision": resolve_precision("auto", "cpu"),
    }


def interleaved(args: argparse.Namespace, legs: dict[str, tuple[int, dict]]) -> list[dict]:
    """Every leg (ranks, overrides) once per round, round after round, so that a busy machine slows them alike."""
    data, work = Path(args.data).resolve(), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rounds = []
    for i in range(args.rounds):
        row = {"round": i}
        for name, (ranks, extra) in legs.items():
            row[name] = run_leg(data, work, ranks, extra, args.steps)
            print(f"round {i} {name}: {row[name]}", flush=True)
        rounds.append(row)
    return rounds


def main(argv: list[str] | None = None) -> int:
    args = parser(__doc__, "ranks").parse_args(argv)
    rounds = interleaved(args, LEGS)
    for row in rounds:
        a, b = (row[n]["s_per_step"] for n in LEGS)
        row["one_rank_over_two"] = round(b / a, 3)
    ratios = [r["one_rank_over_two"] for r in rounds]
    res = {**machine(), "steps": args.steps, "rounds": rounds, "one_rank_over_two_s_per_step": spread(ratios)}
    save(res, args.out)
    print(json.dumps(res["one_rank_over_two_s_per_step"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
