"""What regional torch.compile (`model.compile=true`: every Next-DiT block compiled, dynamic shapes) does to stage1's
step on this machine, against eager.

    .venv/bin/python bench/bench_compile.py --data demo [--rounds 3] [--steps 120]

Each leg is `make stage1`'s trainer on 2 ranks (bench_ranks.run_leg: the demo's packed stage1,
train/configs/stage1_cpu.yaml as the demo runs it), eager and compiled interleaved round after round. Two numbers per
leg: the median seconds per step after warm-up (the steady state), and the seconds its steps took beyond that median
(`first_steps_extra_s`: where the compiling lands, since torch.compile runs at the first forward; inductor caches
it on disk, so only a machine's first run compiles from nothing).
Results: bench/results/compile.json (compiled over eager per step, and the compiled leg's extra seconds beyond
eager's, median and spread).

Measured (2-core AMD EPYC, AVX2, fp32, 60 steps, 3 rounds): compiled 0.76x the seconds per step (0.74-0.92), but its
first steps cost 34-36 s more with inductor's cache warm and 183 s more on the first run (cache empty). So it breaks
even after ~500 steps when the cache is warm and ~2,400 when cold: a fresh machine's demo (stage1's 1,600 steps
first) would lose time. The CPU configs keep model.compile off.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench._results import save, spread  # noqa: E402
from bench.bench_ranks import interleaved, machine, parser  # noqa: E402

LEGS = {"eager": (2, {}), "compiled": (2, {"model.compile": "true"})}


def first_steps_extra_s(leg: dict) -> float:
    """Seconds the leg's steps took beyond `steps` x their median: compiling, warm-up."""
    return round(leg["wall_s"] - leg["startup_s"] - leg["steps"] * leg["s_per_step"], 1)


def summary(rounds: list[dict]) -> dict:
    for r in rounds:
        extra = first_steps_extra_s(r["compiled"]) - first_steps_extra_s(r["eager"])
        r["compiled_first_steps_extra_s"] = round(extra, 1)
    return {
        "compiled_over_eager_s_per_step": spread(
            r["compiled"]["s_per_step"] / r["eager"]["s_per_step"] for r in rounds
        ),
        "compiled_first_steps_extra_s": spread((r["compiled_first_steps_extra_s"] for r in rounds), 1),
    }


def main(argv: list[str] | None = None) -> int:
    args = parser(__doc__, "compile").parse_args(argv)
    rounds = interleaved(args, LEGS)
    res = {**machine(), "steps": args.steps, "rounds": rounds, **summary(rounds)}
    save(res, args.out)
    print(json.dumps({k: v for k, v in res.items() if k.startswith("compiled_")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
