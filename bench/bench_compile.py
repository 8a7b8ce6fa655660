"""Does `model.compile=true` (regional torch.compile of every Next-DiT block) pay for itself in the demo's stage1?

    .venv/bin/python bench/bench_compile.py --data demo [--steps 300] [--rounds 3]

Trains the demo's stage1 (train/configs/stage1_cpu.yaml, 2 ranks, DeepSpeed on CPU: what `make demo` runs) for
--steps from scratch, eager and compiled, interleaved (eager, compiled, eager, ...) for --rounds. Per leg it
records the run's wall seconds (launch, compile and checkpoint included: what the demo would pay) and its steady
rate (median samples/s over the second half of the steps, compile warm-up excluded). Reports the median ratio
compiled / eager of each with its spread. Results: bench/results/compile.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._results import save  # noqa: E402
from bench.bench_text_encoder import train  # noqa: E402

LEGS = {"eager": ("model.compile=false",), "compiled": ("model.compile=true",)}


def steady_rate(metrics: Path) -> float:
    """Median samples/s over the second half of a run's logged steps."""
    rates = [json.loads(line)["samples_per_s"] for line in metrics.read_text().splitlines() if line.strip()]
    return statistics.median(rates[len(rates) // 2 :])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="demo", help="a full demo folder (stages/, captions/)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--work", default="/tmp/bench_compile", help="run folders")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "compile.json"))
    args = p.parse_args(argv)
    data, work = Path(args.data).resolve(), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rounds = []
    for r in range(args.rounds):
        row = {"round": r}
        for leg, overrides in LEGS.items():
            name = f"{leg}-r{r}"
            seconds = train(data, work, name, (*overrides, f"run.steps={args.steps}", "run.log_every=10"), 2)
            row[leg] = {"seconds": seconds, "samples_per_s": steady_rate(work / name / "metrics.jsonl")}
            print(
                f"round {r} {leg}: {seconds:.0f}s, {row[leg]['samples_per_s']:.1f} samples/s", file=sys.stderr
            )
        row["wall_compiled_over_eager"] = round(row["compiled"]["seconds"] / row["eager"]["seconds"], 3)
        row["rate_compiled_over_eager"] = round(
            row["compiled"]["samples_per_s"] / row["eager"]["samples_per_s"], 3
        )
        rounds.append(row)

    def spread(key: str) -> dict:
        vals = [row[key] for row in rounds]
        return {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}

    save({"data": str(data), "steps": args.steps, "ranks": 2, "rounds": rounds,
          "wall_compiled_over_eager": spread("wall_compiled_over_eager"),
          "rate_compiled_over_eager": spread("rate_compiled_over_eager")}, args.out)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
