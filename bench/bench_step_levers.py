"""What stage1's step costs with the two data-side levers, alone and together, against neither.

    .venv/bin/python bench/bench_step_levers.py --data demo [--rounds 3] [--steps 150]

- `data.latent_cache_mb`: each rank encodes an image with the frozen VAE once, then reads its latent from the cache
  (train/latent_cache.py); the demo reads its 160 images for 80 epochs.
- `data.group_caption_levels`: one level x language draw per micro-batch, so its captions have similar lengths and
  the padded text sequence (most of the tokens at 64 px: ~60-77 text against 16 image tokens) is shorter.

Each leg is `make stage1`'s trainer on 2 ranks (bench_ranks.run_leg: the demo's packed stage1,
train/configs/stage1_cpu.yaml with the levers overridden), interleaved round after round; the median seconds per step
after warm-up. Results: bench/results/step_levers.json (each lever's ratio to neither, median and spread).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench._results import save, spread  # noqa: E402
from bench.bench_ranks import interleaved, machine, parser  # noqa: E402

OFF = {"data.latent_cache_mb": 0, "data.group_caption_levels": "false"}
LEGS = {
    "neither": OFF,
    "latent cache": {**OFF, "data.latent_cache_mb": 256},
    "grouped levels": {**OFF, "data.group_caption_levels": "true"},
    "both": {"data.latent_cache_mb": 256, "data.group_caption_levels": "true"},
}


def main(argv: list[str] | None = None) -> int:
    args = parser(__doc__, "step_levers").parse_args(argv)
    rounds = interleaved(args, {name: (2, extra) for name, extra in LEGS.items()})
    ratios = {}
    for name in list(LEGS)[1:]:
        r = [row[name]["s_per_step"] / row["neither"]["s_per_step"] for row in rounds]
        ratios[name] = spread(r)
    res = {**machine(), "steps": args.steps, "rounds": rounds, "s_per_step_over_neither": ratios}
    save(res, args.out)
    print(json.dumps(ratios))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
