"""What limits the tiny captioner's shape recall: its vision tower's grounding losses, per lever, at a fixed step.

    .venv/bin/python bench/bench_captioner_grounding.py [--steps 400] [--variants base,pixels336,wide]

Each variant trains the recipe (train/configs/captioner_tiny.yaml) on its grounding phase alone (the vision tower
and its per-token / per-object heads, no language model: `optim.ground_first_steps`) for --steps steps, one
compute thread, through `unicap train-captioner`'s launcher, and reports its per-object grounding losses averaged
over the last fifth of the steps (cross-entropy: chance is ln 4 = 1.386 for shape over 4 shapes, ln 3 = 1.099 for
size) and its wall time. The caption's recall of a shape cannot beat what the tower separates: a variant whose
object_shape loss stays at chance will not name shapes, whatever the language model does after it.
Results: bench/results/captioner_grounding.json. Losses do not depend on the machine's load; seconds do.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench._results import save  # noqa: E402
from bench._runs import ENV  # noqa: E402

VARIANTS = {
    "base": [],  # the recipe: 168 x 168 px (36 merged tokens), vision tower 64 wide, 2 deep
    "pixels336": ["data.max_pixels=112896"],  # 336 x 336 px: 144 tokens, ~4x the pixels per object
    "wide": ["model.arch.vision_dim=128", "model.arch.vision_depth=4"],  # the tower twice as wide and deep
}
RECIPE = "train/configs/captioner_tiny.yaml"
KEYS = ("object_shape", "object_size", "object_colour", "shape", "size", "image_shapes")


def probe(name: str, overrides: list[str], steps: int, out: Path) -> dict:
    run = out / name
    launch = [sys.executable, "-m", "train.captioner.launch", "--config", RECIPE]
    phase = [f"run.out={run}", f"run.steps={steps + 1}", f"optim.ground_first_steps={steps}"]
    # no checkpoint, a metrics line every 20 steps, no time limit, one compute thread
    settings = ["run.save_every=1000000", "run.log_every=20", "run.max_minutes=0", "run.threads=1"]
    r = subprocess.run([*launch, *phase, *settings, *overrides], cwd=ROOT, env=ENV, capture_output=True, text=True)
    if r.returncode:
        sys.stderr.write(r.stdout[-2000:] + r.stderr[-4000:])
        raise RuntimeError(f"variant {name} failed (exit {r.returncode})")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    tail = [r for r in rows if r["step"] > steps * 0.8 and r["step"] <= steps]
    return {
        "overrides": overrides,
        "steps": steps,
        "seconds": rows[-1]["seconds"],
        "last_fifth_mean": {k: round(sum(r[k] for r in tail) / len(tail), 3) for k in KEYS},
        "load_after": Path("/proc/loadavg").read_text().split()[0],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", default="bench/results/captioner_grounding.json")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-grounding-"))
    chance = {"object_shape": 1.386, "object_size": 1.099}  # ln 4 and ln 3: cross-entropy of a uniform guess
    results = {"recipe": RECIPE, "chance": chance, "variants": {}}
    for name in args.variants.split(","):
        results["variants"][name] = probe(name, VARIANTS[name], args.steps, work)
        print(f"[{name}] {results['variants'][name]}", flush=True)
    save(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
