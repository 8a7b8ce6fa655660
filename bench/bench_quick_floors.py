"""The demo quick preset's adherence over training seeds: where tests/pipelines/test_demo.py's floors come from.

    .venv/bin/python bench/bench_quick_floors.py [--seeds 0,1,2]

One quick-preset data folder (synth, the shipped captioner's captions, scores, stages: pipelines.demo's own steps),
then per seed the quick preset's stage1 -> stage2 -> stage3 (`train.launch`, the preset's overrides plus
run.seed) and `train.adherence` on the held-out long English prompts, as the demo runs it. Results:
bench/results/quick_floors.json (per seed, and the minimum and median per attribute).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._results import save  # noqa: E402
from bench._runs import adherence_rows, launch_cmd, run_logged  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    from pipelines.demo import PRESETS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--work", default="/tmp/bench_quick_floors")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "quick_floors.json"))
    args = p.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    preset = PRESETS["quick"]()
    for step in ("synth", "captioner", "caption", "score", "stages"):
        demo = [sys.executable, "-m", "pipelines.demo", "--workdir", str(work), "--preset", "quick", "--step", step]
        run_logged(demo, work / f"{step}.log")
    results = {
        "preset": "quick",
        "prompts": {"n": preset.adherence, "level": "long", "language": "en"},
        "seeds": {},
    }
    for seed in [int(s) for s in args.seeds.split(",")]:
        runs = work / f"seed{seed}"
        for stage in ("stage1", "stage2", "stage3"):
            trainer = [f"run.out={runs}", "run.progress=false", f"run.seed={seed}", *preset.train[stage]]
            run_logged(launch_cmd(stage, work, 2, trainer), work / f"seed{seed}-{stage}.log")
        prompts = ["--n", str(preset.adherence), "--level", "long", "--language", "en", "--size", "64x64"]
        weights = [arg for s in ("stage1", "stage3") for arg in ("--weights", f"{s}={runs / s / 'final'}")]
        out = work / f"seed{seed}-adherence"
        rows = adherence_rows(work / "heldout", out, [*prompts, *weights], work / f"seed{seed}-adherence.log")
        results["seeds"][str(seed)] = rows
        save(results, args.out)
    for row in ("stage1", "stage3", "stage3, shuffled prompts"):
        per = [r[row] for r in results["seeds"].values()]
        attrs = [a for a in per[0] if all(v[a] is not None for v in per)]  # those judged on every seed
        values = {a: [v[a] for v in per] for a in attrs}
        results[row] = {a: {"min": min(x), "median": statistics.median(x)} for a, x in values.items()}
    save(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
