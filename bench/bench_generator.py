"""The generator alone: how Next-DiT's held-out adherence grows with its training, apart from the captioner and stages.

    .venv/bin/python bench/bench_generator.py [--variants clip-4096,...] [--steps 10000] [--eval-every 2000]
        [--device auto] [--save DIR] [--out bench/results/generator.json]

Each variant trains a freshly initialised Next-DiT on N synthetic square images (seed 777; `datagen.synth`) with
their answer-key long English captions at 64 px: no captioner, no DeepSpeed, no loader. What is kept from the
trainer: the model (`train.model`), the flow objective, time distribution and resolution shift (`train.flow`),
10% caption dropout to the empty caption, AdamW (lr 1e-3, no weight decay), gradient clipping at 1, EMA 0.99 and
bf16 autocast where it is fast (`unicap.runtime.autocast_enabled`); batch 8, as stage1's global batch. Latents and
caption features are computed once. Every --eval-every steps the EMA weights draw 64 held-out prompts (seed 778)
as `train.adherence` does (20 Euler steps, guidance 4, image i from the noise of seed i) and the pixel judge scores
them at 64x64; each result also holds the truth images' VAE round trip at 64 px, the ceiling of that size.

It answers what `bench_schedule.py` cannot on the 2-core demo's budget: whether more training of this generator,
on perfect captions, reaches the held-out goals at all, and on which attributes. Runs on a GPU with --device
(several times the steps in the same minutes). Results (merged by variant into --out): the curve per variant.

Measured on a 2-core Xeon (bf16), 6000 steps (48,000 samples, ~6x what the demo's three stages see; ~11.5 min of
training each): colour 0.82-0.85 and background ~1.0 (the tiny CLIP's text), but count 0.17-0.31 and position
0.14-0.17, shape 0.20-0.32 against a ceiling of 0.49 at 64 px. Count is drawn, not ignored: asked for 1 / 2 / 3
objects of a colour, clip-1024 draws 1.35 / 2.24 / 3.09 blobs of it on average; it misses by stray blobs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

from bench._results import save  # noqa: E402
from datagen import scene_judge, synth  # noqa: E402
from train import flow  # noqa: E402
from train.adherence import accuracy, vae_round_trip  # noqa: E402
from train.checkpoint import save_weights  # noqa: E402
from train.codecs import VAE, text_encoder  # noqa: E402
from train.model import NextDiT, NextDiT_configs  # noqa: E402
from train.sample import from_images, generate  # noqa: E402
from unicap import runtime  # noqa: E402

POOL_SEED, HELDOUT_SEED, HELDOUT = 777, 778, 64
RES, BATCH, LR, EMA, DROP = 64, 8, 1e-3, 0.99, 0.1
COLUMN = "caption_long_en"


@dataclasses.dataclass(frozen=True)
class Variant:
    images: int  # training images
    text_encoder: str = "tiny-clip"
    model: str = "NextDiT_tiny"


VARIANTS = {
    "clip-64": Variant(64),
    "clip-1024": Variant(1024),
    "clip-4096": Variant(4096),
    "captioner-4096": Variant(4096, text_encoder="tiny-captioner"),
}


def square_scenes(seed: int, n: int) -> list[synth.SynthScene]:
    """The first n square scenes of a seed (square: drawn at 64 x 64 without stretching)."""
    out, i = [], 0
    while len(out) < n:
        scene = synth.scene_of(seed, i)
        i += 1
        if scene.width == scene.height:
            out.append(scene)
    return out


def encode_texts(te, captions: list[str], chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, L, D) features and (N, L) masks, chunks padded to the longest."""
    feats, masks = [], []
    with torch.no_grad():
        for start in range(0, len(captions), chunk):
            f, m = te(captions[start : start + chunk])
            feats.append(f.float())
            masks.append(m)
    length = max(f.shape[1] for f in feats)
    feats = [F.pad(f, (0, 0, 0, length - f.shape[1])) for f in feats]
    masks = [F.pad(m, (0, length - m.shape[1])) for m in masks]
    return torch.cat(feats), torch.cat(masks)


def judge(images: list[Image.Image], scenes: list[synth.SynthScene]) -> tuple[dict, dict]:
    """(accuracy per attribute, {objects of a colour the prompt asks for: mean blobs of it seen}): the second
    says whether a count is drawn at all (the mean grows with the prompt's) or only missed by one."""
    small = [im.resize((RES, RES), Image.Resampling.LANCZOS) if im.size != (RES, RES) else im for im in images]
    seen = [scene_judge.analyse(im) for im in small]
    judged = [scene_judge.judge(im, s, analysis=a) for im, s, a in zip(small, scenes, seen, strict=True)]
    counts: dict[int, list[int]] = {}
    for scene, analysis in zip(scenes, seen, strict=True):
        for colour in {o.color for o in scene.objects}:
            asked = sum(o.color == colour for o in scene.objects)
            counts.setdefault(asked, []).append(len(analysis.of(colour)))
    acc = {a: round(v, 3) for a, v in accuracy(judged)[0].items() if v is not None}
    return acc, {n: round(sum(v) / len(v), 2) for n, v in sorted(counts.items())}


def run_variant(name: str, v: Variant, steps: int, eval_every: int, device: str, save_to: Path | None = None) -> dict:
    torch.manual_seed(0)
    te = text_encoder(v.text_encoder, max_length=128).to(device)
    vae = VAE("tiny-trained").to(device)
    scenes, held = square_scenes(POOL_SEED, v.images), square_scenes(HELDOUT_SEED, HELDOUT)
    with torch.no_grad():
        drawn = [synth.render(s).resize((RES, RES), Image.Resampling.LANCZOS) for s in scenes]
        chunks = (from_images(drawn[i : i + 64], device) for i in range(0, len(drawn), 64))  # 64 at a time
        latents = torch.cat([vae.encode(chunk).float() for chunk in chunks])
    feats, masks = encode_texts(te, [synth.captions(s)[COLUMN] for s in scenes])
    empty_f, empty_m = encode_texts(te, [""])  # the dropped caption, padded to the captions' length
    pad = feats.shape[1] - empty_f.shape[1]
    empty_f, empty_m = F.pad(empty_f, (0, 0, 0, pad))[0].to(device), F.pad(empty_m, (0, pad))[0].to(device)
    feats, masks = feats.to(device), masks.to(device)
    model = NextDiT(dataclasses.replace(NextDiT_configs[v.model], cap_feat_dim=te.dim)).to(device)
    ema = {k: p.detach().clone() for k, p in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    autocast = runtime.autocast_enabled(device)
    mu = flow.shift_mu((RES // (vae.factor * model.cfg.patch_size)) ** 2)
    gen = torch.Generator(device="cpu").manual_seed(0)
    held_captions = [synth.captions(s)[COLUMN] for s in held]
    ceiling = judge(vae_round_trip(vae, [synth.render(s) for s in held], (RES, RES), (RES, RES), 16), held)[0]
    curve, losses, t0 = [], [], time.perf_counter()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(scenes), (BATCH,), generator=gen)
        x1, f, m = latents[idx], feats[idx].clone(), masks[idx].clone()
        drop = (torch.rand(BATCH, generator=gen) < DROP).to(device)
        f[drop], m[drop] = empty_f, empty_m
        x0 = torch.randn(x1.shape, generator=gen).to(device)
        t = flow.sample_t(BATCH, mu=mu, generator=gen).to(device)
        xt, target = flow.interpolate(x0, x1, t)
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=autocast):
            pred = model(xt, t, f, m)
        loss = flow.flow_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for k, p in model.state_dict().items():
                if p.dtype.is_floating_point:
                    ema[k].lerp_(p, 1 - EMA)
        losses.append(loss.detach())
        if step % eval_every == 0 or step == steps:
            seconds = time.perf_counter() - t0
            raw = {k: p.detach().clone() for k, p in model.state_dict().items()}
            model.load_state_dict(ema)
            model.eval()
            images = generate(model, te, vae, held_captions, width=RES, height=RES, steps=20, cfg_scale=4.0, seed=0)
            model.load_state_dict(raw)
            model.train()
            acc, count_seen = judge(images, held)
            loss = round(torch.stack(losses[-eval_every:]).mean().item(), 4)
            point = dict(
                step=step,
                samples=step * BATCH,
                train_seconds=round(seconds, 1),
                loss=loss,
                held_out=acc,
                count_seen=count_seen,
            )
            curve.append(point)
            print(f"[{name}] {json.dumps(point)}", flush=True)
            t0 = time.perf_counter() - seconds  # judging is not training time
    if save_to is not None:  # the EMA weights, a folder `unicap sample` and `train.adherence` read
        model.load_state_dict(ema)
        save_weights(save_to / name, model, v.text_encoder, "tiny-trained", step=steps)
    setup = dict(resolution=RES, batch=BATCH, lr=LR, device=device, torch_threads=torch.get_num_threads())
    return {**dataclasses.asdict(v), **setup, "vae_ceiling": ceiling, "curve": curve}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="clip-4096", help=f"comma-separated, of {sorted(VARIANTS)}")
    p.add_argument("--steps", type=int, default=10000)
    p.add_argument("--eval-every", type=int, default=2000)
    p.add_argument("--device", default="auto")
    p.add_argument("--save", type=Path, default=None, help="write each variant's final EMA weights to SAVE/<variant>")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "generator.json"))
    args = p.parse_args(argv)
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; known: {sorted(VARIANTS)}")
    device = runtime.resolve_device(args.device)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {"variants": {}}
    for name in names:
        results["variants"][name] = run_variant(name, VARIANTS[name], args.steps, args.eval_every, device, args.save)
        save(results, str(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
