"""The adherence the demo's quick preset reaches, over training seeds: where tests/pipelines/test_demo.py's floors come from.

    .venv/bin/python bench/bench_quick_floors.py [--seeds 0,1,2]

One quick-preset data folder (synth, the shipped captioner's captions, scores, stages: pipelines.demo's own steps),
then per seed the quick preset's stage1 -> stage2 -> stage3 (`train.launch`, the preset's overrides plus
run.seed) and `train.adherence` on the held-out long English prompts, as the demo runs it. Results:
bench/results/quick_floors.json (per seed, and the minimum and median per attribute).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._results import save  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def run(cmd: list[str], log: Path) -> None:
    with open(log, "w") as f:
        r = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=ENV)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed: see {log}")


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
        run([sys.executable, "-m", "pipelines.demo", "--workdir", str(work), "--preset", "quick", "--step", step],
            work / f"{step}.log")  # fmt: skip
    results = {
        "preset": "quick",
        "prompts": {"n": preset.adherence, "level": "long", "language": "en"},
        "seeds": {},
    }
    for seed in [int(s) for s in args.seeds.split(",")]:
        runs = work / f"seed{seed}"
        for stage in ("stage1", "stage2", "stage3"):
            run([sys.executable, "-m", "train.launch", "--stage", stage, "--config", f"train/configs/{stage}_cpu.yaml",
                 "--data", str(work), "--nproc", "2", "--", f"run.out={runs}", "run.progress=false", f"run.seed={seed}",
                 *preset.train[stage]], work / f"seed{seed}-{stage}.log")  # fmt: skip
        out = work / f"seed{seed}-adherence"
        run([sys.executable, "-m", "train.adherence", "--truth", str(work / "heldout"), "--out", str(out), "--n",
             str(preset.adherence), "--level", "long", "--language", "en", "--size", "64x64",
             "--weights", f"stage1={runs / 'stage1' / 'final'}", "--weights", f"stage3={runs / 'stage3' / 'final'}"],
            work / f"seed{seed}-adherence.log")  # fmt: skip
        results["seeds"][str(seed)] = json.loads((out / "adherence.json").read_text())["rows"]
        save(results, args.out)
    for row in ("stage1", "stage3", "stage3, shuffled prompts"):
        per = [r[row] for r in results["seeds"].values()]
        results[row] = {a: {"min": min(v[a] for v in per), "median": statistics.median(v[a] for v in per)}
                        for a in per[0] if all(v[a] is not None for v in per)}  # fmt: skip
    save(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
