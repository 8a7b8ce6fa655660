"""`unicap sample`: images from a Next-DiT checkpoint.

    unicap sample --ckpt runs/stage3/final --prompt "a red circle" --prompt "两个蓝色方块" --out samples/ \
        --steps 30 --cfg 4.0 --renorm-cfg 1.0 --cfg-trunc 1.0 --size 1024x1024 --seed 0

--ckpt is a weights folder (unicap.contract.checkpoint): a stage's final/ (EMA weights by default), a
checkpoint step folder, or one `train.checkpoint.save_weights` wrote, on a local disk or behind a URI
(s3://bucket/runs/stage3/final: downloaded once into $UNICAP_CACHE/weights). It holds safetensors and JSON
only: nothing is unpickled, so a folder from anywhere cannot run code when loaded.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from train.checkpoint import load_weights
from train.codecs import VAE, TextEncoder
from train.codecs import text_encoder as load_text_encoder
from train.flow import shift_mu
from train.model import NextDiT
from train.run_store import local_weights
from train.sampler import sample
from unicap import runtime
from unicap.contract import checkpoint as contract


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
    steps: int = 30,
    cfg_scale: float = 4.0,
    renorm_cfg: float = 1.0,
    cfg_trunc: float = 1.0,
    cfg_trunc_mode: str = "time",
    method: str = "euler",
    negative_prompt: str = "",
    seed: int = 0,
) -> list[Image.Image]:
    """One image per prompt; seed s gives image i the noise of torch.Generator(s + i) (drawn on the CPU, so
    the same on any device). Runs where the model is, in its dtype; the flow is integrated in fp32."""
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    f = vae.factor
    if width % (f * model.cfg.patch_size) or height % (f * model.cfg.patch_size):
        raise ValueError(f"image size {width}x{height}: both sides must be multiples of {f * model.cfg.patch_size}")
    shape = (model.cfg.in_channels, height // f, width // f)
    gens = [torch.Generator(device="cpu").manual_seed(seed + i) for i in range(len(prompts))]
    noise = torch.stack([torch.randn(shape, generator=g, device="cpu") for g in gens]).to(device)
    cond, cond_mask = text_encoder(prompts)
    neg, neg_mask = text_encoder([negative_prompt] * len(prompts))

    def velocity(x, t, conditional):
        feats, mask = (cond, cond_mask) if conditional else (neg, neg_mask)
        return model(x.to(dtype), t, feats.to(device, dtype), mask.to(device)).float()

    tokens = (shape[1] // model.cfg.patch_size) * (shape[2] // model.cfg.patch_size)
    guidance = dict(cfg_scale=cfg_scale, renorm_cfg=renorm_cfg, cfg_trunc=cfg_trunc, cfg_trunc_mode=cfg_trunc_mode)
    latents = sample(velocity, noise, steps=steps, method=method, mu=shift_mu(tokens), **guidance)
    return to_images(vae.decode(latents))


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
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--method", default="euler", choices=["euler", "midpoint"])
    p.add_argument("--cfg", type=float, default=4.0, help="guidance scale (1 = off)")
    p.add_argument("--renorm-cfg", type=float, default=1.0, help="cap ||guided v|| at r ||v_cond|| (0 = off)")
    p.add_argument("--cfg-trunc", type=float, default=1.0, help="guide only while t < this (see --cfg-trunc-mode)")
    p.add_argument("--cfg-trunc-mode", default="time", choices=["time", "step"])
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one) | cpu | cuda | cuda:N")


def run(args: argparse.Namespace) -> int:
    folder = local_weights(args.ckpt)  # a URI (s3://.../final) is downloaded to $UNICAP_CACHE/weights first
    default = contract.EMA_FILE if (folder / contract.EMA_FILE).exists() else contract.MODEL_FILE
    model, te, vae = load_for_sampling(folder, args.weights or default, args.device)
    width, height = (int(v) for v in args.size.lower().split("x"))
    guidance = dict(cfg_scale=args.cfg, renorm_cfg=args.renorm_cfg, negative_prompt=args.negative_prompt)
    guidance |= dict(cfg_trunc=args.cfg_trunc, cfg_trunc_mode=args.cfg_trunc_mode)
    solver = dict(steps=args.steps, method=args.method, seed=args.seed)
    images = generate(model, te, vae, args.prompt, width=width, height=height, **solver, **guidance)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, (prompt, im) in enumerate(zip(args.prompt, images, strict=True)):
        path = out / f"{i:03d}_{slug(prompt)}_seed{args.seed + i}.png"
        im.save(path)
        print(f"sample: {path}")
    return 0
