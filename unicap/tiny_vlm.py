"""The tiny captioning VLM, built offline: a randomly initialised Qwen2-VL that loads like the real one.

`tiny_qwen2vl()` writes (once, cached: unicap.tiny_build) a complete Hugging Face folder: a Qwen2-VL
(2 text layers, hidden 128; a 2-layer vision tower) with a byte-level BPE tokenizer trained here, Qwen's
chat template and a processor config, which vLLM (offline engine and OpenAI server) and transformers
load as they would the real one. The caption job's model name "tiny" resolves to it (unicap.engines).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from unicap import prompts
from unicap.tiny_build import DONE_MARK, cached, train_bpe

# bump when the build changes (3: tokenizer corpus from unicap's own prompts and vocabulary)
TINY_QWEN2VL_VERSION = "3"
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

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
# the tokenizer corpus's visual vocabulary: (English, Chinese)
COLOURS = [
    ("red", "红色"),
    ("green", "绿色"),
    ("blue", "蓝色"),
    ("yellow", "黄色"),
    ("purple", "紫色"),
    ("orange", "橙色"),
    ("white", "白色"),
    ("grey", "灰色"),
    ("black", "黑色"),
    ("beige", "米色"),
]
SHAPES = [
    ("circle", "圆形"),
    ("square", "正方形"),
    ("triangle", "三角形"),
    ("diamond", "菱形"),
    ("cat", "猫"),
    ("tree", "树"),
    ("house", "房子"),
    ("car", "汽车"),
]
PLACES = [
    ("top left", "左上角"),
    ("top", "上方"),
    ("top right", "右上角"),
    ("left", "左侧"),
    ("center", "中央"),
    ("right", "右侧"),
    ("bottom left", "左下角"),
    ("bottom", "下方"),
    ("bottom right", "右下角"),
]


def tokenizer_corpus() -> list[str]:
    """Training text for the tiny tokenizer: the job's own prompts in every language it names, and
    English and Chinese caption sentences over a small visual vocabulary (colours, shapes, places)."""
    lines = [prompts.SYSTEM_PROMPT]
    for text in prompts.LEVEL_INSTRUCTIONS.values():
        lines += [f"{text} Answer in {name} only, with no preamble." for name in prompts.LANGUAGE_NAMES.values()]
    for i, (colour, colour_zh) in enumerate(COLOURS):
        for j, (shape, shape_zh) in enumerate(SHAPES):
            place, place_zh = PLACES[(i + j) % len(PLACES)]
            lines += [
                f"A flat illustration of a {colour} {shape} at the {place} of the image, on a plain background.",
                f"{colour} {shape}, flat illustration, geometric shapes, {place}",
                f"一幅扁平插画，画面的{place_zh}有一个{colour_zh}{shape_zh}，背景是纯色。",
                f"{colour_zh}{shape_zh}, 扁平插画, 几何图形",
            ]
    lines += [
        'Describe this image in detail. {"long": "...", "medium": "...", "short": "...", "tags": "..."}',
        "请用中文详细描述这张图片。图像中有一只猫、一棵树、天空、建筑、人物、文字、风格、颜色、位置。",
        "A photo of a cat sitting on a wooden table next to a window, soft daylight, realistic style.",
    ]
    return lines


@dataclass(frozen=True)
class Qwen2VLArch:
    """The sizes of a tiny Qwen2-VL. The defaults are `tiny_qwen2vl()`'s (the caption tests' random model);
    the trained tiny captioner (train.captioner) picks its own. mRoPE sections follow Qwen2-VL's split of
    head_dim / 2 (1/4 temporal, 3/8 height, 3/8 width: [16, 24, 24] at head_dim 128), which vLLM asserts."""

    hidden: int = 128
    heads: int = 4
    kv_heads: int = 2
    layers: int = 2
    intermediate: int = 256
    vision_depth: int = 2
    vision_dim: int = 64
    vision_heads: int = 4
    vision_mlp_ratio: int = 2
    vocab_size: int = 1024  # of the BPE tokenizer (special tokens included)

    def mrope_section(self) -> list[int]:
        half = self.hidden // self.heads // 2
        t = half // 4
        h = (half - t) // 2
        return [t, h, half - t - h]


def _word_bpe(corpus: Sequence[str], words: Sequence[str], vocab_size: int):
    """A byte-level BPE whose merges never cross the given words, nor any other CJK character: Chinese
    text then tokenizes into words (as in a real Qwen tokenizer), not into whole memorised phrases."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    alternation = "|".join(sorted(map(re.escape, words), key=len, reverse=True))
    tok = Tokenizer(models.BPE())
    keep_whole = pre_tokenizers.Split(Regex(f"{alternation}|[\u3400-\u9fff]"), behavior="isolated")
    tok.pre_tokenizer = pre_tokenizers.Sequence([keep_whole, pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(list(corpus), trainer)
    return tok


def _build_tokenizer(out: Path, extra_corpus: Sequence[str] = (), vocab_size: int = 1024, words: Sequence[str] = ()):
    from transformers import PreTrainedTokenizerFast

    corpus = [*tokenizer_corpus(), *extra_corpus]
    bpe = _word_bpe(corpus, words, vocab_size) if words else train_bpe(corpus, SPECIAL_TOKENS, vocab_size)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
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


def build_qwen2vl(
    out: Path,
    seed: int,
    arch: Qwen2VLArch = Qwen2VLArch(),
    extra_corpus: Sequence[str] = (),
    max_pixels: int = 1024 * 1024,
    mark: dict | None = None,
    words: Sequence[str] = (),
) -> None:
    """Write a complete random-weight Qwen2-VL folder (weights, tokenizer, chat template, processor and
    generation configs) into `out`; the done mark (unicap.tiny_build.DONE_MARK) is written last.
    `extra_corpus` adds tokenizer training text; `words` (e.g. Chinese words) are kept whole by it."""
    import torch
    from transformers import (
        AutoTokenizer,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
    )

    _build_tokenizer(out, extra_corpus, arch.vocab_size, words)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    # the same in the text config and the top-level one, as in the real checkpoints
    special_ids = dict(
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]
    )
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=arch.hidden,
            intermediate_size=arch.intermediate,
            num_hidden_layers=arch.layers,
            num_attention_heads=arch.heads,
            num_key_value_heads=arch.kv_heads,
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "mrope_section": arch.mrope_section(), "rope_theta": 1_000_000.0},
            **special_ids,
            tie_word_embeddings=False,
        ),
        vision_config=dict(
            depth=arch.vision_depth,
            embed_dim=arch.vision_dim,
            hidden_size=arch.hidden,
            num_heads=arch.vision_heads,
            mlp_ratio=arch.vision_mlp_ratio,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        **special_ids,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).to(torch.bfloat16)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(out, safe_serialization=True)
    # vLLM sizes its encoder cache from these: keep max_pixels >= any --max-pixels a job will pass
    Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=max_pixels).save_pretrained(out)
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    mark = mark or {"kind": "tiny-qwen2-vl", "version": TINY_QWEN2VL_VERSION, "seed": seed}
    (out / DONE_MARK).write_text(json.dumps(mark))


def tiny_qwen2vl(seed: int = 0, root: Path | None = None) -> Path:
    """Path of the tiny Qwen2-VL folder, built on first use (atomic: concurrent builders are safe)."""
    tag = hashlib.sha1(f"{TINY_QWEN2VL_VERSION}:{seed}".encode()).hexdigest()[:10]
    return cached(f"tiny-qwen2-vl-{tag}", lambda p: build_qwen2vl(p, seed), root)
