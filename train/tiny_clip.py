"""A tiny CLIP trained here on synthetic (image, caption) pairs, so that CLIP scores mean image-text agreement.

    python -m train.tiny_clip              # the folder's path; trains it first if absent (shipped in models/)
    python -m train.tiny_clip --no-train   # the path if shipped or cached, else exit code 1
    python -m train.tiny_clip steps=300    # a recipe override: another cache entry

The random `--clip tiny` (unicap.clip) scores noise: stages cut by it are cut at random. This one is an
open_clip CLIP (its model classes, its `ClipLoss`) trained on scenes of datagen.synth with their answer-key
captions, every level and language, one drawn per image and step. Its folder is an open_clip `local-dir:`
(open_clip_config.json, open_clip_model.safetensors, and the byte-level BPE tokenizer the tiny Gemma-2 uses,
trained on the same captions: Chinese and English in 96 tokens, where CLIP's own tokenizer would spend 3 bytes
per Chinese character); `unicap score --clip <folder>` and the demo's score step load it as they would any
local CLIP. Images are squashed to a square (`resize_mode: squash`), so no object is cropped away.

Measured on held-out scenes (another seed) when built, and kept in the folder's unicap_tiny.json: the AUC of
true captions against shuffled ones (another held-out image's caption), per level x language; the goal is 0.9.
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from train.tiny_trained import Log, TrainedTiny
from unicap.tiny_build import recipe_overrides

TINY_CLIP_TRAINED_VERSION = "1"  # bump when the build code changes


@dataclass(frozen=True)
class Recipe:
    seed: int = 0  # weights init and batch order
    data_seed: int = 3000  # training scenes (the demo's pool is seed 0, its held-out set 7777)
    heldout_seed: int = 3001  # the AUC's scenes
    images: int = 2048
    heldout: int = 256
    image_size: int = 96  # 8 x 8 patches of 12 px
    patch: int = 12
    width: int = 64  # both towers
    layers: int = 2
    embed_dim: int = 64
    context: int = 96  # tokens: the longest synthetic caption is 94, and <eos>
    steps: int = 1500
    batch: int = 64
    lr: float = 2e-3
    warmup: int = 100


RECIPE = Recipe()
TINY_CLIP = TrainedTiny("tiny-clip-trained", TINY_CLIP_TRAINED_VERSION, RECIPE, "train.tiny_clip")
with_overrides = recipe_overrides  # `key=value` overrides of a recipe (values parsed as JSON: steps=300)
folder_name = TINY_CLIP.folder_name
cached_clip = TINY_CLIP.find  # the folder shipped in models/ or cached, else None


def open_clip_config(recipe: Recipe, vocab: int, pad_id: int, eos_id: int) -> dict:
    """open_clip's local-dir config: the model (text pooled at the end-of-text token) and its preprocessing."""
    heads = max(1, recipe.width // 32)
    return {
        "model_cfg": {
            "embed_dim": recipe.embed_dim,
            "vision_cfg": {
                "image_size": recipe.image_size,
                "patch_size": recipe.patch,
                "width": recipe.width,
                "layers": recipe.layers,
                "head_width": recipe.width // heads,
            },
            "text_cfg": {
                "context_length": recipe.context,
                "vocab_size": vocab,
                "width": recipe.width,
                "heads": heads,
                "layers": recipe.layers,
                "hf_tokenizer_name": "unicap-tiny-bpe",
                "pool_type": "eos",
                "eos_id": eos_id,
                "pad_id": pad_id,
            },
        },
        "preprocess_cfg": {"resize_mode": "squash", "interpolation": "bicubic"},
    }


def write_tokenizer(out: Path):
    """The tiny Gemma-2's BPE (train.tiny_codecs.caption_corpus), ending every text with <eos> (CLIP pools there)."""
    from tokenizers.processors import TemplateProcessing

    from train.tiny_codecs import GEMMA_SPECIAL_TOKENS, caption_corpus, gemma_tokenizer
    from unicap.tiny_build import train_bpe

    bpe = train_bpe(caption_corpus(), GEMMA_SPECIAL_TOKENS)
    eos = bpe.token_to_id("<eos>")
    bpe.post_processor = TemplateProcessing(single="$A <eos>", special_tokens=[("<eos>", eos)])
    tok = gemma_tokenizer(bpe, model_max_length=4096)
    tok.save_pretrained(out)
    return tok


# ---------------------------------------------------------------- data


def scenes(seed: int, n: int, preprocess) -> tuple[list, list[list[str]]]:
    """(preprocessed image tensors, each image's 8 answer-key captions) for scenes 0..n-1 of `seed`."""
    from datagen import synth

    images, caps = [], []
    for i in range(n):
        scene = synth.make_scene(random.Random(f"{seed}:{i}"))
        images.append(preprocess(synth.render(scene)))
        by_column = synth.captions(scene)
        caps.append([by_column[k] for k in sorted(by_column)])
    return images, caps


def agreement_auc(model, tokenizer, images, caps, seed: int = 0) -> dict[str, float]:
    """Per caption column (caption_{level}_{lang}) and overall: the probability that an image's true caption scores
    above another held-out image's caption of the same column (Mann-Whitney AUC)."""
    import torch

    from datagen import synth

    gen = random.Random(seed)
    n = len(images)
    columns = sorted(synth.captions(synth.make_scene(random.Random("0:0"))))
    shuffled = [(i + gen.randrange(1, n)) % n for i in range(n)]  # never the image's own caption
    with torch.no_grad():
        img = torch.nn.functional.normalize(model.encode_image(torch.stack(images)), dim=-1)
        out, true_all, false_all = {}, [], []
        for v in range(len(caps[0])):
            txt = torch.nn.functional.normalize(model.encode_text(tokenizer([c[v] for c in caps])), dim=-1)
            true = (img * txt).sum(-1)
            false = (img * txt[shuffled]).sum(-1)
            out[columns[v]] = _auc(true, false)
            true_all.append(true)
            false_all.append(false)
    out["all"] = _auc(torch.cat(true_all), torch.cat(false_all))
    return out


def _auc(pos, neg) -> float:
    diff = pos[:, None] - neg[None, :]
    return round(float((diff > 0).float().mean() + 0.5 * (diff == 0).float().mean()), 4)


# ---------------------------------------------------------------- training


def train_clip(recipe: Recipe, out: Path, log: Log = print) -> dict:
    """Writes the trained model into `out` (config, tokenizer, weights); returns the summary."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    t0 = time.time()
    tok = write_tokenizer(out)
    cfg = open_clip_config(recipe, len(tok), tok.pad_token_id, tok.eos_token_id)
    (out / "open_clip_config.json").write_text(json.dumps(cfg, indent=1))
    torch.manual_seed(recipe.seed)
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    images, caps = scenes(recipe.data_seed, recipe.images, preprocess)
    x = torch.stack(images)
    tokens = torch.stack([tokenizer(c) for c in caps])  # (N, 8, context)
    held = scenes(recipe.heldout_seed, recipe.heldout, preprocess)
    t_data = time.time() - t0
    loss_fn = open_clip.ClipLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(0.9, 0.98), weight_decay=0.1)
    rng = torch.Generator().manual_seed(recipe.seed)
    model.train()
    losses = []
    for step in range(recipe.steps):
        warm = min(1.0, (step + 1) / recipe.warmup)
        for g in opt.param_groups:  # linear warmup, then cosine to 5%
            g["lr"] = recipe.lr * warm * (0.05 + 0.95 * 0.5 * (1 + _cos(step / recipe.steps)))
        idx = torch.randperm(len(x), generator=rng)[: recipe.batch]
        variant = torch.randint(0, tokens.shape[1], (len(idx),), generator=rng)
        img_f, txt_f, scale = model(x[idx], tokens[idx, variant])
        loss = loss_fn(img_f, txt_f, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % 100 == 0:
            recent = sum(losses[-100:]) / 100
            log(f"[tiny-clip] step {step + 1}/{recipe.steps}  loss {recent:.3f}  {time.time() - t0:.0f}s")
    model.eval()
    auc = agreement_auc(model, tokenizer, *held)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "open_clip_model.safetensors"))
    seconds = {"train_seconds": round(time.time() - t0, 1), "data_seconds": round(t_data, 1)}
    losses_seen = {"first_loss": round(sum(losses[:20]) / 20, 4), "final_loss": round(sum(losses[-100:]) / 100, 4)}
    return {**seconds, **losses_seen, "heldout_auc": auc, "threads": torch.get_num_threads()}


def _cos(frac: float) -> float:
    import math

    return math.cos(math.pi * frac)


def tiny_clip(recipe: Recipe = RECIPE, root: Path | None = None) -> Path:
    """The trained tiny CLIP's folder (`local-dir:` for open_clip; unicap.clip.load_clip takes the folder)."""
    return TINY_CLIP.build(recipe, root, lambda out, log: train_clip(recipe, out, log))


def main(argv: list[str] | None = None) -> int:
    return TINY_CLIP.main(argv, __doc__, tiny_clip)


if __name__ == "__main__":
    sys.exit(main())
