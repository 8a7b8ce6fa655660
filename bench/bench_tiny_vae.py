"""The trained tiny VAE (train.tiny_vae, `model.vae: tiny-trained`): training time and held-out reconstruction.

    .venv/bin/python bench/bench_tiny_vae.py [--n 64] [--seed 4242] [--retrain]

1. train  the recipe (train.tiny_vae.RECIPE): reuses the machine's cached build unless --retrain (then it trains
          in a temporary cache); the training time is the build's own clock (unicap_tiny.json)
2. eval   --n held-out synthetic images of --seed, each at both stage resolutions (64, 128 px) as the pack job
          stores them, through train.codecs.VAE (encode -> decode, what the trainer and the sampler do): L1 and
          PSNR of the trained VAE and of the random one ("tiny"), the scaled latents' mean and std
Results: bench/results/tiny_vae.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench._results import save  # noqa: E402


def evaluate(vae, images) -> dict:
    import torch

    out: dict = {}
    zs = []
    for res in sorted({r for r, _ in images}):
        l1, mse = [], []
        for r, x in images:
            if r != res:
                continue
            z = vae.encode(x)
            zs.append(z.flatten())
            rec = vae.decode(z)
            l1.append(float((rec - x).abs().mean()))
            mse.append(float((rec - x).pow(2).mean()))
        m = sum(mse) / len(mse)
        # images in [-1, 1]: peak-to-peak 2, PSNR = 10 log10(2^2 / MSE), the mean MSE over the images
        out[f"{res}px"] = {"l1": round(sum(l1) / len(l1), 4), "psnr_db": round(10 * math.log10(4 / m), 2)}
    z = torch.cat(zs)
    out["all"] = {"l1": round(sum(v["l1"] for v in out.values()) / len(out), 4)}
    out["latents"] = {"mean": round(float(z.mean()), 4), "std": round(float(z.std()), 4)}
    return out


def heldout_images(seed: int, n: int) -> list:
    """(resolution, (1, 3, H, W) tensor) of synthetic scenes 0..n-1 of `seed`, at both stage resolutions."""
    from train import tiny_vae

    images = []
    for i in range(n):
        _, ims = tiny_vae.scene_images(seed, i)
        images += [(r, tiny_vae.to_tensor(im)[None]) for r, im in ims.items()]
    return images


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=64, help="held-out images (each at 64 and 128 px)")
    p.add_argument("--seed", type=int, default=4242, help="held-out seed (the recipe trains on seed 1000's scenes)")
    p.add_argument("--retrain", action="store_true", help="train afresh in a temporary cache")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "tiny_vae.json"))
    args = p.parse_args()
    os.environ.setdefault("UNICAP_CACHE", str(ROOT / ".cache"))

    import dataclasses

    import torch

    from train import tiny_vae
    from train.codecs import VAE
    from unicap.tiny_build import DONE_MARK

    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        trained_now = args.retrain or tiny_vae.cached_vae() is None
        folder = tiny_vae.tiny_vae(root=Path(tmp) if args.retrain else None)
        wall = time.time() - t0
        mark = json.loads((folder / DONE_MARK).read_text())
        images = heldout_images(args.seed, args.n)
        trained, random_vae = evaluate(VAE(str(folder)), images), evaluate(VAE("tiny"), images)
    results = {
        "training": {
            "recipe": dataclasses.asdict(tiny_vae.RECIPE),
            "model": str(folder) if not args.retrain else "(temporary)",
            "train_seconds": mark["train_seconds"],
            "data_seconds": mark["data_seconds"],
            "trained_now": trained_now,
            "wall_seconds_this_call": round(wall, 1) if trained_now else 0.0,
            "threads": mark.get("threads", os.cpu_count()),  # older builds did not record it
            "shift_factor": mark["shift_factor"],
            "scaling_factor": mark["scaling_factor"],
        },
        "heldout": {"seed": args.seed, "images": args.n, "resolutions": list(tiny_vae.RESOLUTIONS)},
        "trained": trained,
        "random": random_vae,
        "l1_ratio_trained_over_random": round(trained["all"]["l1"] / random_vae["all"]["l1"], 4),
    }
    save(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
