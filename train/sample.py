"""`unicap sample`: images from a Next-DiT checkpoint.

    unicap sample --ckpt ckpt.pt --prompt "a red circle" --prompt "两个蓝色方块" --out samples/ \
        --steps 30 --cfg 4.0 --renorm-cfg 1.0 --cfg-trunc 1.0 --size 1024x1024 --seed 0

A checkpoint is a torch file {"config": NextDiTConfig fields, "model": state_dict, "text_encoder":
id/folder/"tiny", "vae": id/folder/"tiny", ...}; `save_checkpoint` writes one.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from train.codecs import VAE, TextEncoder
from train.flow import shift_mu
from train.model import NextDiT, NextDiTConfig
from train.sampler import sample


def save_checkpoint(path: str | Path, model: NextDiT, text_encoder: str, vae: str, **extra) -> Path:
    from unicap.atomic import atomic_path

    with atomic_path(path) as tmp:
        torch.save({"config": asdict(model.cfg), "model": model.state_dict(), "text_encoder": text_encoder,
                    "vae": vae, **extra}, tmp)  # fmt: skip
    return Path(path)


def load_checkpoint(path: str | Path) -> tuple[NextDiT, dict]:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    cfg = dict(ckpt["config"])
    cfg["axes_dims"], cfg["axes_lens"] = tuple(cfg["axes_dims"]), tuple(cfg["axes_lens"])
    model = NextDiT(NextDiTConfig(**cfg))
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt


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
    """One image per prompt; seed s gives image i the noise of torch.Generator(s + i)."""
    f = vae.factor
    assert width % (f * model.cfg.patch_size) == 0 and height % (f * model.cfg.patch_size) == 0, (
        f"size must be a multiple of {f * model.cfg.patch_size}"
    )
    shape = (model.cfg.in_channels, height // f, width // f)
    noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + i)) for i in range(len(prompts))])
    cond, cond_mask = text_encoder(prompts)
    neg, neg_mask = text_encoder([negative_prompt] * len(prompts))

    def velocity(x, t, conditional):
        feats, mask = (cond, cond_mask) if conditional else (neg, neg_mask)
        return model(x, t, feats, mask)

    tokens = (shape[1] // model.cfg.patch_size) * (shape[2] // model.cfg.patch_size)
    latents = sample(velocity, noise, steps=steps, method=method, mu=shift_mu(tokens), cfg_scale=cfg_scale,
                     renorm_cfg=renorm_cfg, cfg_trunc=cfg_trunc, cfg_trunc_mode=cfg_trunc_mode)  # fmt: skip
    pixels = ((vae.decode(latents) + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(np.ascontiguousarray(p)) for p in pixels]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="checkpoint file written by the trainer / save_checkpoint")
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


def run(args: argparse.Namespace) -> int:
    model, ckpt = load_checkpoint(args.ckpt)
    te, vae = TextEncoder(ckpt["text_encoder"]), VAE(ckpt["vae"])
    width, height = (int(v) for v in args.size.lower().split("x"))
    images = generate(model, te, vae, args.prompt, width=width, height=height, steps=args.steps,
                      cfg_scale=args.cfg, renorm_cfg=args.renorm_cfg, cfg_trunc=args.cfg_trunc,
                      cfg_trunc_mode=args.cfg_trunc_mode, method=args.method,
                      negative_prompt=args.negative_prompt, seed=args.seed)  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, (prompt, im) in enumerate(zip(args.prompt, images, strict=True)):
        path = out / f"{i:03d}_{slug(prompt)}_seed{args.seed + i}.png"
        im.save(path)
        print(f"sample: {path}")
    return 0
