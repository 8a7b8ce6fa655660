"""`unicap calibrate-cache`: fit the step cache's rescaling polynomial on the weights at hand (TeaCache calibration).

    unicap calibrate-cache --ckpt runs/stage3/final            # writes runs/stage3/final/teacache.json
    unicap calibrate-cache --ckpt runs/stage3/final --prompt "a red circle" --prompt "两个蓝色的正方形" \
        --size 128x128 --steps 10,20,50 --degree 1

Draws the prompts with Euler (guidance --cfg, no cache) at each of --steps step counts and records, for every pair of
consecutive forwards of one guidance branch, the relative L1 change of the first block's modulated input (what the
cache sees) and of the block stack's residual (what reusing it gets wrong). A degree --degree polynomial fitted by
least squares maps the first to the second. Several step counts make the changes span what samplers at 10 to 50
steps see; degree 1 (the default) stays sane outside that span, where TeaCache's degree 4 can turn negative or
explode (on the demo's stage3 a degree-4 fit over 50 steps alone went negative at 20 steps' changes).
train/step_cache.py accumulates it against the threshold, so a threshold reads as "relative residual drift allowed
before the stack runs again". The coefficients of one model are not another's (a 2.6B Lumina-Image 2.0's are
published; a 1.9M demo model's differ), so each weights folder is calibrated on its own and the result stored
beside its tensors, with the fit's quality and its inputs.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from train.run_store import local_weights
from train.sample import generate, load_for_sampling
from train.sampler import check_settings
from train.step_cache import StepCache, fit_coefficients, save_coefficients
from unicap.contract import checkpoint as contract

# prompts of the synthetic domain in both languages (the demo's weights were trained on it); --prompt replaces them
PROMPTS = [
    "a red circle on a white background",
    "两个蓝色的正方形",
    "a small green triangle in the top left",
    "three yellow squares on a black background",
    "一个紫色的圆形在右下角",
    "two orange triangles and a blue circle",
    "a large cyan square in the centre on a grey background",
    "四个红色的三角形",
]


def calibrate(
    folder: Path,
    prompts: list[str],
    *,
    size: tuple[int, int] | None = None,
    steps: tuple[int, ...] = (10, 20, 50),
    solver: str = "euler",
    cfg: float = 4.0,
    degree: int = 1,
    seed: int = 0,
    batch: int = 8,
    device: str = "auto",
) -> dict:
    """Fit and write FOLDER/teacache.json; returns what it wrote."""
    for n in steps:
        check_settings(solver, n)
    if degree < 1 or not prompts or batch < 1:
        raise ValueError("--degree and --batch must be positive, and there must be prompts")
    weights = contract.EMA_FILE if (folder / contract.EMA_FILE).exists() else contract.MODEL_FILE
    model, te, vae = load_for_sampling(folder, weights, device)
    if size is None:
        res = ((contract.read_state(folder).get("config") or {}).get("data") or {}).get("resolution") or 256
        size = (res, res)
    t0 = time.perf_counter()
    records: list[tuple[float, float]] = []
    for n in steps:
        for start in range(0, len(prompts), batch):
            cache = StepCache(0.0, n, record=True)
            chunk = prompts[start : start + batch]
            drawing = dict(width=size[0], height=size[1], steps=n, solver=solver, cfg_scale=cfg, seed=seed + start)
            generate(model, te, vae, chunk, **drawing, step_cache=cache)
            records += cache.records
    coefficients, fit = fit_coefficients(records, degree)
    info = {
        "degree": degree,
        "fit": fit,
        "calibration": {
            "weights": weights,
            "prompts": prompts,
            "size": list(size),
            "solver": solver,
            "steps": list(steps),
            "cfg": cfg,
            "seed": seed,
            "batch": batch,
            "seconds": round(time.perf_counter() - t0, 1),
        },
    }
    path = save_coefficients(folder, coefficients, info)
    return {"path": str(path), "coefficients": coefficients, **info}


def parse_size(text: str) -> tuple[int, int]:
    w, sep, h = text.lower().partition("x")
    if not sep or not w.isdigit() or not h.isdigit():
        raise ValueError(f"--size {text!r}: give WIDTHxHEIGHT in pixels, e.g. 128x128")
    return int(w), int(h)


def parse_steps(text: str) -> tuple[int, ...]:
    try:
        steps = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--steps {text!r}: step counts, comma-separated, e.g. 10,20,50") from None
    return steps


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="weights folder: a stage's final/ or a checkpoint step-N/ folder")
    p.add_argument("--prompt", action="append", help="a calibration prompt (repeat; default: 8 built-in, en + zh)")
    p.add_argument("--size", default=None, help="WIDTHxHEIGHT (default: the weights' training resolution)")
    p.add_argument("--steps", default="10,20,50", help="step counts drawn, comma-separated (default 10,20,50)")
    p.add_argument("--solver", default="euler", help="reference solver (default euler)")
    p.add_argument("--cfg", type=float, default=4.0, help="guidance scale (default 4.0)")
    p.add_argument("--degree", type=int, default=1, help="polynomial degree (default 1; TeaCache's is 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=8, help="prompts drawn at once (default 8)")
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one) | cpu | cuda | cuda:N")


def run(args: argparse.Namespace) -> int:
    if "://" in args.ckpt:
        raise ValueError(f"--ckpt {args.ckpt}: calibrate a local weights folder (the file is written beside it)")
    folder = local_weights(args.ckpt)
    size = parse_size(args.size) if args.size else None
    result = calibrate(
        folder,
        args.prompt or PROMPTS,
        size=size,
        steps=parse_steps(args.steps),
        solver=args.solver,
        cfg=args.cfg,
        degree=args.degree,
        seed=args.seed,
        batch=args.batch,
        device=args.device,
    )
    fit = result["fit"]
    shown = ", ".join(f"{c:.4g}" for c in result["coefficients"])
    print(f"calibrate-cache: {fit['pairs']} pairs, R^2 {fit['r2']}, coefficients [{shown}]")
    print(f"calibrate-cache: {result['path']}")
    return 0


if __name__ == "__main__":
    import sys

    from unicap.cli import module_main

    sys.exit(module_main("train.calibrate_cache"))
