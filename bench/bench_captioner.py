"""The tiny captioner: its training time, and its accuracy on held-out images through the real caption job.

    .venv/bin/python bench/bench_captioner.py [--n 200] [--seed 7777] [--retrain] [--baseline]

1. train   the recipe train/configs/captioner_tiny.yaml (train.captioner.tiny): reuses the cached model unless
           --retrain (then it trains in a fresh cache folder); training time from the run's own clock
2. synth   --n held-out synthetic images of --seed (the recipe trains on seed 1000's images)
3. caption `unicap caption --model <folder> --max-pixels <the recipe's>` (Ray Data + vLLM), timed
4. eval    `unicap eval-captions` against the answer key: the full table (recall per kind, hallucination,
           language, status) per level x language, and the issue's goal (ok >= 95%; colour, shape and background
           recall >= 0.9 in every column; object hallucination <= 5%)
--baseline also captions with the untrained starting model (same sizes, random weights) for contrast.
Results: bench/results/captioner.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench._results import save  # noqa: E402


def caption_and_eval(model: str, data: Path, out: Path, max_pixels: int, *extra: str) -> dict:
    from datagen.answer_key import evaluate_folder
    from unicap import eval_captions

    unicap = str(Path(sys.executable).with_name("unicap"))  # the venv's command line
    where = ["--input", str(data), "--output", str(out)]
    cmd = [unicap, "caption", *where, "--model", model, "--max-pixels", str(max_pixels), "--batch-size", "32", *extra]
    t0 = time.time()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.time() - t0
    if r.returncode != 0:
        raise SystemExit(f"caption job failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    metrics = evaluate_folder(out, data)
    print(eval_captions.format_table(metrics))
    return {"caption_job_seconds": round(seconds, 1), "metrics": metrics}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200, help="held-out images")
    p.add_argument("--seed", type=int, default=7777, help="held-out seed (the recipe trains on seed 1000)")
    p.add_argument("--retrain", action="store_true", help="train afresh in a temporary cache")
    p.add_argument("--baseline", action="store_true", help="also caption with the untrained starting model")
    p.add_argument("--workdir", default=None)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "captioner.json"))
    args = p.parse_args()
    os.environ.setdefault("UNICAP_CACHE", str(ROOT / ".cache"))

    from datagen.synth import synth
    from train.captioner import tiny
    from train.captioner.config import load as load_config
    from unicap.tiny_build import DONE_MARK

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_captioner_"))
    root = work / "cache" if args.retrain else None
    t0 = time.time()
    folder = tiny.tiny_captioner(root=root)
    wall = time.time() - t0
    provenance = json.loads((folder / "unicap_captioner.json").read_text())
    mark = json.loads((folder / DONE_MARK).read_text())
    cfg = load_config(tiny.CONFIG)
    training = {
        "model": str(folder),
        "steps": provenance["step"],
        "images_seen": provenance["samples_consumed"],
        "train_seconds": provenance["train_seconds"],
        "trained_now": args.retrain or wall > 60,
        "wall_seconds_this_call": round(wall, 1),
        "recipe": str(tiny.CONFIG.relative_to(ROOT)),
        "max_pixels": cfg.data.max_pixels,
        "mark": mark,
    }
    data = work / f"heldout_{args.seed}_{args.n}"
    synth(str(data), args.n, seed=args.seed, shard_size=100)
    results = {"training": training, "heldout": {"seed": args.seed, "images": args.n}}
    results["trained"] = caption_and_eval(str(folder), data, work / "captions_trained", cfg.data.max_pixels)
    if args.baseline:
        from train.captioner.base import tiny_base

        untrained = tiny_base(cfg.model.arch, cfg.model.seed)
        results["untrained"] = caption_and_eval(str(untrained), data, work / "captions_untrained", cfg.data.max_pixels)
    goal = results["trained"]["metrics"]["goal"]
    met = "met" if goal["met"] else "not met: " + "; ".join(goal["misses"][:6])
    seen = f"{training['steps']} steps, {training['images_seen']} images, {training['train_seconds']:.0f}s"
    print(f"training: {seen}; goal {met}")
    save(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
