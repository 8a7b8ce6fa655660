"""A tiny FLUX-layout VAE trained here, on the synthetic images: `model.vae: tiny-trained`.

    python -m train.tiny_vae              # the folder's path; trains it first if absent (~3.5 min, 2 cores)
    python -m train.tiny_vae --no-train   # the path if cached, else exit code 1
    python -m train.tiny_vae steps=200    # a recipe override: another cache entry

"tiny" (train.tiny_codecs) is a random AutoencoderKL: it loads and runs like FLUX's VAE, but what it decodes
is noise, so a Next-DiT trained on its latents samples noise too. This one is trained to reconstruct the
images the demo trains on: datagen.synth scenes, rendered on the fly from `random.Random(f"{seed}:{i}")`,
resized and centre-cropped to their aspect-ratio bucket at 64 and 128 px and JPEG-round-tripped, exactly as
the pack job (pipelines.pack) stores them; 128 px images as random 64 px crops. Loss: L1 + MSE
reconstruction + a small KL, on decorrelated colours (color_transform: without it the weak green-magenta
axis had not been learned after 2000 steps, and greens decoded purple). Afterwards `shift_factor` and
`scaling_factor` are set from the latents of images it never trained on, so that train.codecs' latents
(mean - shift) * scale are about zero-mean and unit-variance.

What it gets right and wrong (held-out, bench/results/tiny_vae.json): background and object colours and
positions, blob-like shapes (corners rounded, small objects soft); the written words are lost.

The layout is FLUX's: 16 latent channels (NextDiT_tiny's in_channels), 8x down (4 blocks; train.codecs
derives the factor from block_out_channels), no quant convs. 8x at 64 px is 8x8 latents: enough for
colours and placement of these flat scenes (what limited quality in the measurements was training time,
not the latent size), and it keeps the Next-DiT's token count (and so the demo's step time) that of the
FLUX layout; 4x would quadruple the tokens. The mid-block attention is left out: the net is
fully convolutional, so patches of one size train it for every bucket size.

Cached once per machine (unicap.tiny_build.cached): the key is TINY_VAE_VERSION plus the recipe, so any
change of the recipe builds a new folder. Deterministic given the recipe (seed included) on one machine
and thread count; another thread count sums floats in another order and ends at another model, so a recipe
is judged over seeds and thread counts (bench/bench_tiny_vae_seeds.py), never one run. One caller trains
(unicap.tiny_build.cached: a file lock, rank 0 of a process group), with every core unless told (`--threads`;
`make demo` gives it one core beside the captioner's training); the others wait for its folder.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from train.tiny_trained import Log, TrainedTiny
from unicap.tiny_build import recipe_overrides

# bump when the build code changes: a new folder is built instead of a stale one loaded
TINY_VAE_VERSION = "1"
RESOLUTIONS = (64, 128)  # the CPU stages' resolutions (train/configs/stage{1,2,3}_cpu.yaml)


@dataclass(frozen=True)
class Recipe:
    seed: int = 0  # weights init and batch order
    data_seed: int = 1000  # training scenes: random.Random(f"{data_seed}:{i}"), i < images
    stats_seed: int = 2000  # held-out scenes for the latent statistics (shift/scale)
    images: int = 1024  # scenes rendered once (each at 64 and 128 px)
    stats_images: int = 128
    steps: int = 2000
    # steps matter more than batch size here: 8 trains as well as 16 per step, at half the cost
    batch: int = 8
    patch: int = 64  # 128 px images train as random patch x patch crops
    # 3e-3 learned slowly and unreliably: held-out L1 0.04-0.06 at 1.5e-3 on every seed and thread count tried,
    # 0.06-0.14 at 3e-3 (seed 0 on one thread, as make demo trains it: 0.12, CI failed on it), 0.14 at 6e-3
    # (bench/bench_tiny_vae_seeds.py, bench/results/tiny_vae_seeds.json)
    lr: float = 1.5e-3
    warmup: int = 100
    kl_weight: float = 1e-6  # per element, beside the per-element L1 / MSE
    # decode mean + std * noise (a VAE) or the mean (what train.codecs encodes)
    sample_posterior: bool = False
    mse_weight: float = 1.0
    whiten: bool = True  # train in decorrelated colours (folded into the first and last convs afterwards)
    whiten_eps: float = 0.01
    block_out_channels: tuple[int, ...] = (16, 16, 32, 64)  # 4 blocks: 8x down; 0.69M parameters
    layers_per_block: int = 1
    # GroupNorm erases a flat region's absolute colour within a group: few, wide groups
    norm_num_groups: int = 4


RECIPE = Recipe()
TINY_VAE = TrainedTiny("tiny-vae", TINY_VAE_VERSION, RECIPE, "train.tiny_vae")
# `key=value` overrides of a recipe (values parsed as JSON: steps=200, block_out_channels=[16,32,32,32])
with_overrides = recipe_overrides
folder_name = TINY_VAE.folder_name
cached_vae = TINY_VAE.find  # the folder shipped in models/ or cached, else None


# ---------------------------------------------------------------- images


def bucket_image(im, resolution: int):
    """A rendered image as the pack job stores it at `resolution`: its bucket, centre crop, JPEG."""
    from PIL import Image

    from train.buckets import assign_bucket, bucket_table, resize_to_bucket
    from unicap.contract import packed

    table = bucket_table(resolution)
    size = table[int(assign_bucket(im.width, im.height, table))]
    buf = io.BytesIO()
    resize_to_bucket(im, size).save(buf, format="JPEG", quality=packed.JPEG_QUALITY)
    return Image.open(buf).convert("RGB")


def scene_images(seed: int, index: int, resolutions=RESOLUTIONS):
    """(scene, {resolution: PIL image}) of synthetic image `index` of `seed`."""
    from datagen import synth

    scene = synth.make_scene(random.Random(f"{seed}:{index}"))
    full = synth.render(scene)
    return scene, {r: bucket_image(full, r) for r in resolutions}


def to_tensor(im):
    """PIL RGB -> (3, H, W) float32 in [-1, 1], as train.data gives the trainer."""
    import numpy as np
    import torch

    x = np.asarray(im, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0
    return torch.from_numpy(np.ascontiguousarray(x))


def _pool(seed: int, n: int) -> dict[int, dict[tuple[int, int], list]]:
    """resolution -> bucket size (w, h) -> list of (3, h, w) tensors, for scenes 0..n-1 of `seed`."""
    out: dict[int, dict[tuple[int, int], list]] = {r: {} for r in RESOLUTIONS}
    for i in range(n):
        _, ims = scene_images(seed, i)
        for r, im in ims.items():
            out[r].setdefault(im.size, []).append(to_tensor(im))
    return out


# ---------------------------------------------------------------- the model


def build_model(recipe: Recipe):
    from train.tiny_codecs import flux_layout_vae

    sizes = {"layers_per_block": recipe.layers_per_block, "norm_num_groups": recipe.norm_num_groups}
    latents = {"scaling_factor": 1.0, "shift_factor": 0.0}  # set from held-out latents after training
    return flux_layout_vae(recipe.block_out_channels, mid_block_add_attention=False, **sizes, **latents)


def _batches(recipe: Recipe, pool: dict, rng: random.Random):
    """Endless training batches: even steps a 64 px bucket (whole images, one bucket per batch, drawn by
    its share of the images), odd steps random patch x patch crops of 128 px images."""
    import torch

    lo, hi = pool[RESOLUTIONS[0]], [x for xs in pool[RESOLUTIONS[1]].values() for x in xs]
    sizes = sorted(lo)
    weights = [len(lo[s]) for s in sizes]
    p = recipe.patch
    step = 0
    while True:
        if step % 2 == 0:
            group = lo[rng.choices(sizes, weights)[0]]
            yield torch.stack([group[rng.randrange(len(group))] for _ in range(recipe.batch)])
        else:
            crops = []
            for _ in range(recipe.batch):
                x = hi[rng.randrange(len(hi))]
                y0, x0 = rng.randint(0, x.shape[1] - p), rng.randint(0, x.shape[2] - p)
                crops.append(x[:, y0 : y0 + p, x0 : x0 + p])
            yield torch.stack(crops)
        step += 1


def train_vae(recipe: Recipe, log: Log = print):
    """The trained AutoencoderKL (eval mode, shift/scale set) and a summary dict."""
    import torch

    t0 = time.time()
    pool = _pool(recipe.data_seed, recipe.images)
    t_data = time.time() - t0
    torch.manual_seed(recipe.seed)
    vae = build_model(recipe).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=recipe.lr, betas=(0.9, 0.99), weight_decay=0.0)

    def lr_factor(i: int) -> float:  # linear warmup, then cosine down to 5%
        return min(1.0, (i + 1) / max(recipe.warmup, 1)) * (0.05 + 0.475 * (1 + math.cos(math.pi * i / recipe.steps)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    batches = _batches(recipe, pool, random.Random(recipe.seed))
    color = color_transform(pool, recipe.whiten_eps) if recipe.whiten else torch.eye(3)
    gen = torch.Generator().manual_seed(recipe.seed)
    t1, l1_avg = time.time(), None
    for step in range(1, recipe.steps + 1):
        x = torch.einsum("ij,bjhw->bihw", color, next(batches))
        post = vae.encode(x).latent_dist
        z = post.mean
        if recipe.sample_posterior:  # the noise is drawn on the CPU: the same on any device
            z = z + post.std * torch.randn(z.shape, generator=gen).to(z.device)
        rec = vae.decode(z).sample
        l1 = (rec - x).abs().mean()
        mse = (rec - x).pow(2).mean()
        kl = post.kl().mean() / post.mean[0].numel()  # per latent element
        loss = l1 + recipe.mse_weight * mse + recipe.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        l1_avg = l1.item() if l1_avg is None else 0.98 * l1_avg + 0.02 * l1.item()
        if step % 100 == 0 or step == recipe.steps:
            log(f"[tiny-vae] step {step}/{recipe.steps}  l1 {l1_avg:.4f}  kl {kl.item():.1f}  {time.time() - t1:.0f}s")
    t_train = time.time() - t1
    vae.eval().requires_grad_(False)
    fold_color_transform(vae, color)
    shift, std = latent_stats(vae, recipe.stats_seed, recipe.stats_images)
    vae.register_to_config(shift_factor=shift, scaling_factor=1.0 / std)
    seconds = {"data_seconds": round(t_data, 1), "train_seconds": round(t_train, 1)}
    return vae, {**seconds, "final_l1": l1_avg, "shift_factor": shift, "scaling_factor": 1.0 / std}


def latent_stats(vae, seed: int, n: int) -> tuple[float, float]:
    """Mean and std of the raw latent means (encode(x).latent_dist.mean) of n held-out images, both sizes."""
    import torch

    total, total_sq, count = 0.0, 0.0, 0
    with torch.no_grad():
        for i in range(n):
            _, ims = scene_images(seed, i)
            for im in ims.values():
                z = vae.encode(to_tensor(im)[None]).latent_dist.mean.double()
                total, total_sq, count = (
                    total + float(z.sum()),
                    total_sq + float(z.pow(2).sum()),
                    count + z.numel(),
                )
    mean = total / count
    return mean, (total_sq / count - mean**2) ** 0.5


# ---------------------------------------------------------------- the cache


def color_transform(pool: dict, eps: float):
    """A 3x3 map of RGB to decorrelated colours whose every axis varies as much as the strongest (luminance).

    The synthetic images' colour covariance is dominated by luminance (eigenvalues ~0.68 / 0.086 / 0.019: the
    green-magenta axis is ~35x weaker), and a network learns each axis at a speed of its variance: trained on
    RGB, 2000 steps gave shapes and one colour axis (greens came out purple). Trained on these colours (and
    its loss measured in them), every axis learns at once. No shift, only a linear map: zero padding stays
    zero padding, so folding it into the convs (fold_color_transform) is exact."""
    import torch

    x = torch.cat([t.flatten(1) for by_size in pool.values() for ts in by_size.values() for t in ts], 1)
    e, v = torch.linalg.eigh(torch.cov(x.double()))
    return (v @ torch.diag((e.max() / (e + eps)).sqrt()) @ v.T).float()


def fold_color_transform(vae, color) -> None:
    """Make the VAE take and give RGB: encoder conv_in reads A @ rgb, decoder conv_out gives A^-1 @ its output."""
    import torch

    with torch.no_grad():
        conv_in, conv_out = vae.encoder.conv_in, vae.decoder.conv_out
        conv_in.weight.copy_(torch.einsum("oipq,ij->ojpq", conv_in.weight, color))
        inv = torch.linalg.inv(color.double()).float()
        conv_out.weight.copy_(torch.einsum("ij,jopq->iopq", inv, conv_out.weight))
        conv_out.bias.copy_(inv @ conv_out.bias)


@contextlib.contextmanager
def _threads(n: int | None):
    """Train with n threads (None: every core; a DeepSpeed rank had set its threads to its share of them)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n or os.cpu_count() or 1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _train_into(out: Path, recipe: Recipe, threads: int | None, log: Log) -> dict:
    import torch

    with _threads(threads):
        vae, summary = train_vae(recipe, log=log)
        summary["threads"] = torch.get_num_threads()  # not in the cache key, but it decides the exact model
    vae.save_pretrained(out, safe_serialization=True)
    return summary


def tiny_vae(recipe: Recipe = RECIPE, root: Path | None = None, threads: int | None = None) -> Path:
    """The trained tiny VAE's folder (AutoencoderKL.from_pretrained loads it), trained first if absent.

    threads: torch threads for the training (None: every core); not part of the cache key (`make demo` trains
    it on one core beside the captioner)."""
    return TINY_VAE.build(recipe, root, lambda out, log: _train_into(out, recipe, threads, log))


def main(argv: list[str] | None = None) -> int:
    return TINY_VAE.main(argv, __doc__, tiny_vae, threads=True)


if __name__ == "__main__":
    sys.exit(main())
