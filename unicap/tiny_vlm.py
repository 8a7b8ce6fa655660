"""Offline builders of tiny, randomly initialised models of the real architectures.

Nothing can be downloaded on the build machines, so tests and the offline demo build these
locally, once (cached under $UNICAP_CACHE/models, default ./.cache/models), and load them through
exactly the code path a real model id or local folder takes.

- `tiny_qwen2vl()`: a Qwen2-VL (2 text layers, hidden 128; a 2-layer vision tower) with a byte-level
  BPE tokenizer trained here, Qwen's chat template and a processor config: a complete HF folder
  that vLLM (offline engine and OpenAI server) and transformers load as they would the real one.
- `tiny_gemma2()`: a Gemma-2 text encoder (hidden 32, 2 layers) with its own tiny tokenizer, the
  family of Lumina-Image 2.0's Gemma-2-2B.
- `tiny_flux_vae()`: a diffusers AutoencoderKL in the FLUX layout (16 latent channels, 8x down,
  no quant convs, shift 0.1159, scale 0.3611) with 4 narrow blocks.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

TINY_QWEN2VL_VERSION = "2"
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|image_pad|>", "<|video_pad|>",
]  # fmt: skip

# Qwen2-VL's chat template (image / video / text content parts), as shipped with the real models.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def cache_root() -> Path:
    return Path(os.environ.get("UNICAP_CACHE", Path.cwd() / ".cache")) / "models"


def _corpus() -> list[str]:
    """Training text for the tiny tokenizer: English and Chinese caption vocabulary, prompts, JSON."""
    from datagen import synth

    lines = []
    for i in range(200):
        _item, caps = synth.synth_item(seed=12345, index=i)
        lines += list(caps.values())
    lines += [
        'Describe this image in detail. {"long": "...", "medium": "...", "short": "...", "tags": "..."}',
        "请用中文详细描述这张图片。图像中有一只猫、一棵树、天空、建筑、人物、文字、风格、颜色、位置。",
        "A photo of a cat sitting on a wooden table next to a window, soft daylight, realistic style.",
    ]
    return lines


def _build_tokenizer(out: Path, special_tokens: list[str] | None = None, **fast_kwargs):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=special_tokens or SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    if special_tokens is not None:  # a plain text-encoder tokenizer
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=512, **fast_kwargs)
        fast.save_pretrained(out)
        return fast
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=SPECIAL_TOKENS[1:],
        model_max_length=4096,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    # the real checkpoints name the Qwen2 tokenizer class; vLLM and AutoTokenizer read this field
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "Qwen2Tokenizer"
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
    return fast


def _build_qwen2vl(out: Path, seed: int) -> None:
    import torch
    from transformers import (
        AutoTokenizer,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
    )

    _build_tokenizer(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    hidden, heads = 128, 4
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=heads,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 1_000_000.0},
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
            tie_word_embeddings=False,
        ),
        vision_config=dict(
            depth=2, embed_dim=64, hidden_size=hidden, num_heads=4, mlp_ratio=2,
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
        ),  # fmt: skip
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).to(torch.bfloat16)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(out, safe_serialization=True)
    # vLLM sizes its encoder cache from these: keep max_pixels >= any --max-pixels a job will pass
    Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=1024 * 1024).save_pretrained(out)
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (out / "unicap_tiny.json").write_text(json.dumps({"kind": "tiny-qwen2-vl", "seed": seed}))


def _build_gemma2(out: Path, seed: int) -> None:
    import torch
    from transformers import AutoTokenizer, Gemma2Config, Gemma2Model

    _build_tokenizer(out, ["<pad>", "<eos>", "<bos>", "<unk>"], pad_token="<pad>", eos_token="<eos>",
                     bos_token="<bos>", unk_token="<unk>")  # fmt: skip
    tok = AutoTokenizer.from_pretrained(out)
    cfg = Gemma2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, max_position_embeddings=512,
        sliding_window=128, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )  # fmt: skip
    torch.manual_seed(seed)
    Gemma2Model(cfg).save_pretrained(out, safe_serialization=True)
    (out / "unicap_tiny.json").write_text(json.dumps({"kind": "tiny-gemma2", "seed": seed}))


def _build_flux_vae(out: Path, seed: int) -> None:
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8,
        scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
        mid_block_add_attention=True,
    )  # fmt: skip
    vae.save_pretrained(out, safe_serialization=True)
    (out / "unicap_tiny.json").write_text(json.dumps({"kind": "tiny-flux-vae", "seed": seed}))


def tiny_gemma2(seed: int = 0, root: Path | None = None) -> Path:
    return _cached(f"tiny-gemma2-{TINY_QWEN2VL_VERSION}-{seed}", lambda p: _build_gemma2(p, seed), root)


def tiny_flux_vae(seed: int = 0, root: Path | None = None) -> Path:
    return _cached(f"tiny-flux-vae-{TINY_QWEN2VL_VERSION}-{seed}", lambda p: _build_flux_vae(p, seed), root)


def tiny_qwen2vl(seed: int = 0, root: Path | None = None) -> Path:
    """Path of the tiny Qwen2-VL folder, built on first use (atomic: concurrent builders are safe)."""
    tag = hashlib.sha1(f"{TINY_QWEN2VL_VERSION}:{seed}".encode()).hexdigest()[:10]
    return _cached(f"tiny-qwen2-vl-{tag}", lambda p: _build_qwen2vl(p, seed), root)


def _cached(name: str, build, root: Path | None = None) -> Path:
    path = (root or cache_root()) / name
    if (path / "unicap_tiny.json").exists():
        return path
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        build(tmp)
        try:
            tmp.rename(path)
        except OSError:  # another process finished first
            if not (path / "unicap_tiny.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


TINY_CLIP_NAME = "unicap-tiny-clip"
TINY_CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def _build_clip(out: Path, seed: int) -> None:
    import open_clip
    import torch
    from safetensors.torch import save_file

    (out / f"{TINY_CLIP_NAME}.json").write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(out)
    torch.manual_seed(seed)
    model = open_clip.create_model(TINY_CLIP_NAME, pretrained=None)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "open_clip_model.safetensors"))
    (out / "unicap_tiny.json").write_text(json.dumps({"kind": "tiny-clip", "seed": seed}))


def tiny_clip(seed: int = 0, root: Path | None = None) -> Path:
    """Folder with an open_clip model config (`unicap-tiny-clip.json`) and random weights."""
    return _cached(f"tiny-clip-{TINY_QWEN2VL_VERSION}-{seed}", lambda p: _build_clip(p, seed), root)


def tiny_aesthetic_head(dim: int, seed: int = 0, root: Path | None = None) -> Path:
    """A LAION-style aesthetic MLP head with random weights, saved as a state_dict file."""

    def build(p: Path) -> None:
        import torch

        from unicap.clip import AestheticHead

        torch.manual_seed(seed)
        torch.save(AestheticHead(dim).state_dict(), p / "aesthetic.pt")
        (p / "unicap_tiny.json").write_text(json.dumps({"kind": "tiny-aesthetic", "dim": dim, "seed": seed}))

    return _cached(f"tiny-aesthetic-{dim}-{seed}", build, root) / "aesthetic.pt"
