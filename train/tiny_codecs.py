"""The trainer's tiny codecs, built offline: a Gemma-2 text encoder and a FLUX-layout VAE.

"tiny" in train.codecs resolves to these folders (built once, cached: unicap.tiny_build), loaded through
the same code as google/gemma-2-2b and FLUX.1's VAE.

- `tiny_gemma2()`: a Gemma-2 text encoder (hidden 32, 2 layers) with its own byte-level BPE tokenizer
  trained on the synthetic set's captions, the family of Lumina-Image 2.0's Gemma-2-2B.
- `tiny_flux_vae()`: a diffusers AutoencoderKL in the FLUX layout (16 latent channels, 8x down, no
  quant convs, shift 0.1159, scale 0.3611) with 4 narrow blocks.

`flux_layout_vae` and `gemma_tokenizer` build that layout and that tokenizer for the trained tiny models too
(train.tiny_vae, train.tiny_clip).
"""

from __future__ import annotations

import json
from pathlib import Path

from unicap.tiny_build import DONE_MARK, cached, train_bpe

TINY_GEMMA2_VERSION = "3"  # bump when a build changes: a new folder is built instead of a stale one loaded
TINY_FLUX_VAE_VERSION = "2"
GEMMA_SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>"]


def caption_corpus() -> list[str]:
    """The tokenizer's training text: captions of the synthetic set (English and Chinese), prompts, JSON."""
    from datagen import synth
    from train.text_format import format_prompt

    lines = []
    for i in range(200):
        _item, caps = synth.synth_item(seed=12345, index=i)
        lines += list(caps.values())
    # the trainer's system prompt, often enough that BPE learns its words whole: version 2 split it into 101
    # tokens, which left nothing of a caption inside the CPU configs' text_max_length of 96
    lines += [format_prompt("")] * 50
    lines += [
        'Describe this image in detail. {"long": "...", "medium": "...", "short": "...", "tags": "..."}',
        "请用中文详细描述这张图片。图像中有一只猫、一棵树、天空、建筑、人物、文字、风格、颜色、位置。",
        "A photo of a cat sitting on a wooden table next to a window, soft daylight, realistic style.",
    ]
    return lines


def gemma_tokenizer(bpe, model_max_length: int):
    """A transformers tokenizer on a BPE trained with GEMMA_SPECIAL_TOKENS (unicap.tiny_build.train_bpe), each
    special token in its role."""
    from transformers import PreTrainedTokenizerFast

    roles = {"pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>", "unk_token": "<unk>"}
    return PreTrainedTokenizerFast(tokenizer_object=bpe, model_max_length=model_max_length, **roles)


def flux_layout_vae(block_out_channels: tuple[int, ...], **sizes):
    """A diffusers AutoencoderKL in FLUX's layout: RGB in and out, 16 latent channels, one encoder and one decoder
    block per entry of block_out_channels (n blocks: 2^(n-1) x down), no quant convs. `sizes`: layers_per_block,
    norm_num_groups, mid_block_add_attention, scaling_factor, shift_factor."""
    from diffusers import AutoencoderKL

    n = len(block_out_channels)
    blocks = {"down_block_types": ("DownEncoderBlock2D",) * n, "up_block_types": ("UpDecoderBlock2D",) * n}
    layout = {"in_channels": 3, "out_channels": 3, "latent_channels": 16, "block_out_channels": block_out_channels}
    return AutoencoderKL(**layout, **blocks, use_quant_conv=False, use_post_quant_conv=False, **sizes)


def _build_gemma2(out: Path, seed: int) -> None:
    import torch
    from transformers import AutoTokenizer, Gemma2Config, Gemma2Model

    gemma_tokenizer(train_bpe(caption_corpus(), GEMMA_SPECIAL_TOKENS), model_max_length=512).save_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    sizes = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    attention = {"num_key_value_heads": 1, "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 128}
    special = {"pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id}
    cfg = Gemma2Config(vocab_size=len(tok), max_position_embeddings=512, **sizes, **attention, **special)
    torch.manual_seed(seed)
    Gemma2Model(cfg).save_pretrained(out, safe_serialization=True)
    (out / DONE_MARK).write_text(json.dumps({"kind": "tiny-gemma2", "version": TINY_GEMMA2_VERSION, "seed": seed}))


def _build_flux_vae(out: Path, seed: int) -> None:
    import torch

    torch.manual_seed(seed)
    sizes = {"layers_per_block": 1, "norm_num_groups": 8, "mid_block_add_attention": True}
    vae = flux_layout_vae((16, 16, 32, 32), scaling_factor=0.3611, shift_factor=0.1159, **sizes)
    vae.save_pretrained(out, safe_serialization=True)
    (out / DONE_MARK).write_text(json.dumps({"kind": "tiny-flux-vae", "version": TINY_FLUX_VAE_VERSION, "seed": seed}))


def tiny_gemma2(seed: int = 0, root: Path | None = None) -> Path:
    return cached(f"tiny-gemma2-{TINY_GEMMA2_VERSION}-{seed}", lambda p: _build_gemma2(p, seed), root)


def tiny_flux_vae(seed: int = 0, root: Path | None = None) -> Path:
    return cached(f"tiny-flux-vae-{TINY_FLUX_VAE_VERSION}-{seed}", lambda p: _build_flux_vae(p, seed), root)
