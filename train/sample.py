"""`unicap sample`: images from a Next-DiT checkpoint.

    unicap sample --ckpt runs/stage3/final --prompt "a red circle" --prompt "两个蓝色方块" --out samples/ \
        --solver ab2 --steps 15 --cache-threshold 0 --cfg 4.0 --size 1024x1024 --seed 0

Sampling (train/sampler.py): --solver (euler, midpoint, ab2, ab3, dpm++2m) over --steps steps of the shifted time
grid; --cache-threshold the step cache's threshold (train/step_cache.py, TeaCache; 0 = every step computed). By
default the settings chosen in bench/results/sampling.json (DEFAULT_SAMPLING), the cache only where the weights
folder holds its calibrated coefficients (teacache.json, `unicap calibrate-cache`). Every PNG carries its settings
and transformer evaluations in a text chunk (SAMPLING_KEY) and in a JSON file beside it.

--ckpt is a weights folder (unicap.contract.checkpoint): a stage's final/ (EMA weights by default), a
checkpoint step folder, or one `train.checkpoint.save_weights` wrote, on a local disk or behind a URI
(s3://bucket/runs/stage3/final: downloaded once into $UNICAP_CACHE/weights). It holds safetensors and JSON
only: nothing is unpickled, so a folder from anywhere cannot run code when loaded.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from train.checkpoint import load_weights
from train.codecs import VAE, TextEncoder
from train.codecs import text_encoder as load_text_encoder
from train.flow import shift_mu
from train.model import NextDiT
from train.run_store import local_weights
from train.sampler import SOLVERS, check_settings, sample
from train.step_cache import COEFFICIENTS_FILE, StepCache, load_coefficients
from unicap import runtime
from unicap.contract import checkpoint as contract

# the settings `unicap sample` uses, chosen from the table in bench/results/sampling.json (demo stage3, CPU): the
# cheapest setting on the Pareto front whose adherence stayed within 0.02 of Euler at 50 steps on 2 x 128 prompts;
# no cache threshold that skipped a step did there (train/config.py: the sample grids' solver and threshold)
DEFAULT_SAMPLING = {"solver": "ab2", "steps": 15, "cache_threshold": 0.0}
SAMPLING_KEY = "unicap_sampling"  # the PNG text chunk (and PIL Image.info key) with an image's sampling metadata


def slug(text: str) -> str:
    return re.sub(r"[^\w]+", "_", text, flags=re.UNICODE).strip("_")[:40] or "empty"


@torch.no_grad()
def generate(
    model: NextDiT,
    text_encoder: TextEncoder,
    vae: VAE,
    prompts: list[str],
    *,
    width: int,
    height: int,
    seed: int = 0,
    **sampling,
) -> list[Image.Image]:
    """One image per prompt (generate_latents, decoded); each image's info[SAMPLING_KEY] is the JSON of its sampling
    settings, its seed and the batch's transformer evaluations (the forwards whose block stack ran: every image of
    the batch is drawn by each)."""
    drawing = dict(width=width, height=height, seed=seed, vae_factor=vae.factor)
    latents, meta = generate_latents(model, text_encoder, prompts, **drawing, **sampling)
    images = to_images(vae.decode(latents))
    for i, im in enumerate(images):
        im.info[SAMPLING_KEY] = json.dumps({**meta, "seed": seed + i})
    return images


@torch.no_grad()
def generate_latents(
    model: NextDiT,
    text_encoder: TextEncoder,
    prompts: list[str],
    *,
    width: int,
    height: int,
    steps: int = 30,
    solver: str = "euler",
    cache_threshold: float = 0.0,
    cache_coefficients: list[float] | None = None,
    cfg_scale: float = 4.0,
    renorm_cfg: float = 1.0,
    cfg_trunc: float = 1.0,
    cfg_trunc_mode: str = "time",
    negative_prompt: str = "",
    seed: int = 0,
    step_cache: StepCache | None = None,
    vae_factor: int = 8,
) -> tuple[torch.Tensor, dict]:
    """(final latents (B, C, H/f, W/f) in fp32, f the VAE's factor; the sampling metadata). Seed s gives image i the
    noise of torch.Generator(s + i) (drawn on the CPU, so the same on any device). Runs where the model is, in its
    dtype; the flow is integrated in fp32. step_cache: a StepCache to use instead of one made from cache_threshold and
    cache_coefficients (calibration reads its records)."""
    check_settings(solver, steps, cache_threshold)
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    f = vae_factor
    if width % (f * model.cfg.patch_size) or height % (f * model.cfg.patch_size):
        raise ValueError(f"image size {width}x{height}: both sides must be multiples of {f * model.cfg.patch_size}")
    shape = (model.cfg.in_channels, height // f, width // f)
    gens = [torch.Generator(device="cpu").manual_seed(seed + i) for i in range(len(prompts))]
    noise = torch.stack([torch.randn(shape, generator=g, device="cpu") for g in gens]).to(device)
    cond, cond_mask = text_encoder(prompts)
    neg, neg_mask = text_encoder([negative_prompt] * len(prompts))
    # converted once: the step cache keeps the caption's layout while these stay the same tensors
    branches = {
        True: (cond.to(device, dtype), cond_mask.to(device)),
        False: (neg.to(device, dtype), neg_mask.to(device)),
    }
    cache = step_cache or StepCache(cache_threshold, steps, cache_coefficients)

    def velocity(x, t, conditional):
        feats, mask = branches[bool(conditional)]
        return model(x.to(dtype), t, feats, mask, cache=cache.branch(conditional)).float()

    tokens = (shape[1] // model.cfg.patch_size) * (shape[2] // model.cfg.patch_size)
    guidance = dict(cfg_scale=cfg_scale, renorm_cfg=renorm_cfg, cfg_trunc=cfg_trunc, cfg_trunc_mode=cfg_trunc_mode)
    latents = sample(
        velocity, noise, steps=steps, solver=solver, mu=shift_mu(tokens), on_step=cache.on_step, **guidance
    )
    settings = sampling_settings(solver, steps, cache.threshold, cache.coefficients, **guidance)
    return latents, {**settings, **cache.stats()}


def sampling_settings(
    solver: str, steps: int, cache_threshold: float, cache_coefficients: list[float] | None, **guidance
) -> dict:
    """The settings an output records (and the `unicap sample` arguments that redo them)."""
    cache = "off" if cache_threshold <= 0 else "calibrated" if cache_coefficients is not None else "uncalibrated"
    args = f"--solver {solver} --steps {steps} --cache-threshold {cache_threshold:g}"
    return {
        "solver": solver,
        "steps": steps,
        "cache_threshold": cache_threshold,
        "cache": cache,
        **guidance,
        "args": args,
    }


def sampling_of(image: Image.Image) -> dict | None:
    """An image's sampling metadata (from generate, or read back from a PNG it was saved to), or None."""
    text = image.info.get(SAMPLING_KEY)
    return json.loads(text) if text else None


def save_png(image: Image.Image, path: Path) -> None:
    """The image as PNG with its sampling metadata in a text chunk (SAMPLING_KEY), when it has any."""
    info = PngInfo()
    if SAMPLING_KEY in image.info:
        info.add_text(SAMPLING_KEY, image.info[SAMPLING_KEY])
    image.save(path, pnginfo=info)


def to_images(pixels: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1], on any device -> B RGB images."""
    rgb = ((pixels.float() + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(p)) for p in rgb]


def from_images(images: list[Image.Image], device="cpu") -> torch.Tensor:
    """RGB images of one size -> (B, 3, H, W) in [-1, 1] on `device` (to_images' inverse, up to rounding)."""
    rgb = np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images])
    return torch.from_numpy(rgb).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1


def load_for_sampling(folder: Path, weights: str, device: str = "auto", codecs: dict | None = None):
    """(model, text encoder, VAE) of a weights folder on `device` (runtime: a GPU when there is one, in bf16;
    the CPU in fp32). `codecs` caches the codecs across folders of one run."""
    device = runtime.resolve_device(device)
    dtype = runtime.resolve_dtype("bf16" if device.startswith("cuda") else "fp32", device)
    model, state = load_weights(folder, weights)
    key = (state["text_encoder"], state["vae"], device)
    codecs = {} if codecs is None else codecs
    if key not in codecs:
        te = load_text_encoder(state["text_encoder"], dtype=dtype).to(device)
        codecs[key] = (te, VAE(state["vae"], dtype=dtype).to(device))
    return model.to(device, dtype), *codecs[key]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="weights folder: a stage's final/, a checkpoint step-N/ folder")
    p.add_argument(
        "--weights",
        default=None,
        choices=[contract.MODEL_FILE, contract.EMA_FILE, contract.RAW_FILE],
        help="which tensors (default: ema.safetensors in a checkpoint folder, else model.safetensors)",
    )
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for a batch)")
    p.add_argument("--out", required=True, help="folder for the PNGs")
    p.add_argument("--size", default="256x256", help="WIDTHxHEIGHT in pixels (default 256x256)")
    add_sampling_arguments(
        p,
        DEFAULT_SAMPLING,
        cache_help="default: {cache_threshold} when the weights folder holds "
        f"{COEFFICIENTS_FILE} (`unicap calibrate-cache`), else 0",
    )
    p.add_argument("--cfg", type=float, default=4.0, help="guidance scale (1 = off)")
    p.add_argument("--renorm-cfg", type=float, default=1.0, help="cap ||guided v|| at r ||v_cond|| (0 = off)")
    p.add_argument("--cfg-trunc", type=float, default=1.0, help="guide only while t < this (see --cfg-trunc-mode)")
    p.add_argument("--cfg-trunc-mode", default="time", choices=["time", "step"])
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one) | cpu | cuda | cuda:N")


def add_sampling_arguments(p: argparse.ArgumentParser, defaults: dict, cache_help: str = "") -> None:
    """--solver, --steps, --cache-threshold (None: the command's own default), shared by the commands that sample."""
    solvers = ", ".join(SOLVERS)
    p.add_argument("--solver", default=defaults["solver"], help=f"ODE solver: {solvers} (default {defaults['solver']})")
    p.add_argument("--method", dest="solver", help=argparse.SUPPRESS)  # the old name of --solver
    p.add_argument("--steps", type=int, default=defaults["steps"], help=f"sampling steps (default {defaults['steps']})")
    p.add_argument(
        "--cache-threshold",
        type=float,
        default=None,
        help="step cache threshold, 0 = every step computed (" + cache_help.format(**defaults) + ")",
    )


def resolve_cache(folder: Path, threshold: float | None, default: float) -> tuple[float, list[float] | None]:
    """(threshold, coefficients) for a weights folder: None takes `default` when the folder is calibrated, else 0;
    a threshold above 0 for a folder that is not is refused in one line."""
    coefficients = load_coefficients(folder)
    if threshold is None:
        return (default if coefficients is not None else 0.0), coefficients
    if threshold > 0 and coefficients is None:
        raise ValueError(
            f"--cache-threshold {threshold:g}: {folder} has no {COEFFICIENTS_FILE}; run `unicap calibrate-cache "
            f"--ckpt {folder}` first (or --cache-threshold 0)"
        )
    return threshold, coefficients


def run(args: argparse.Namespace) -> int:
    check_settings(args.solver, args.steps, 0.0 if args.cache_threshold is None else args.cache_threshold)
    folder = local_weights(args.ckpt)  # a URI (s3://.../final) is downloaded to $UNICAP_CACHE/weights first
    threshold, coefficients = resolve_cache(folder, args.cache_threshold, DEFAULT_SAMPLING["cache_threshold"])
    default = contract.EMA_FILE if (folder / contract.EMA_FILE).exists() else contract.MODEL_FILE
    model, te, vae = load_for_sampling(folder, args.weights or default, args.device)
    width, height = (int(v) for v in args.size.lower().split("x"))
    guidance = dict(cfg_scale=args.cfg, renorm_cfg=args.renorm_cfg, negative_prompt=args.negative_prompt)
    guidance |= dict(cfg_trunc=args.cfg_trunc, cfg_trunc_mode=args.cfg_trunc_mode)
    solver = dict(steps=args.steps, solver=args.solver, seed=args.seed)
    cache = dict(cache_threshold=threshold, cache_coefficients=coefficients)
    images = generate(model, te, vae, args.prompt, width=width, height=height, **solver, **cache, **guidance)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, (prompt, im) in enumerate(zip(args.prompt, images, strict=True)):
        path = out / f"{i:03d}_{slug(prompt)}_seed{args.seed + i}.png"
        save_png(im, path)
        meta = {"prompt": prompt, "weights": str(args.ckpt), "size": [width, height], **sampling_of(im)}
        path.with_suffix(".json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
        print(f"sample: {path}")
    print(f"sample: {sampling_of(images[0])['args']}, {sampling_of(images[0])['evaluations']} transformer evaluations")
    return 0
