"""The model a captioner run starts from: a local folder or hub id (real runs), or a tiny one built offline.

`tiny_base(arch, seed)` builds (once, cached under $UNICAP_CACHE/models like every tiny model) a randomly
initialised Qwen2-VL of the given sizes with unicap.tiny_vlm's builder, whose BPE tokenizer is trained on
the job's prompts and, here, on synthetic captions too: the words the captioner will write are single
tokens, as they are in a real Qwen tokenizer (a tokenizer that splits "triangle" in four makes every
answer four times longer to learn and to generate).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

from datagen import synth
from unicap.tiny_build import cached
from unicap.tiny_vlm import TINY_QWEN2VL_VERSION, Qwen2VLArch, build_qwen2vl

BASE_VERSION = "2"  # bump when the corpus or the build changes
# Chinese words of the synthetic captions' templates, kept whole by the tokenizer (other CJK: one per character)
ZH_FRAME_WORDS = (
    "一幅 扁平 极简 风格 数字 插画 背景 是 纯 画面 中 有 个 几何 图形 位于 "
    "的 底部 用 大写字母 写着 单词 没有 其他 物体 阴影 也 纹理 上 和 文字"
).split()


def zh_words() -> list[str]:
    """The Chinese vocabulary of the synthetic set: colours, backgrounds, shapes, sizes, places, numbers."""
    words = [zh for _, zh in synth.COLORS.values()] + [zh for _, zh in synth.BACKGROUNDS.values()]
    words += list(synth.SHAPES.values()) + [zh for _, zh in synth.SIZES.values()]
    words += [zh for _, zh in synth.CELLS] + synth.ZH_NUM
    return sorted(set(words + ZH_FRAME_WORDS))


def caption_corpus(n: int = 600, seed: int = 424242) -> list[str]:
    """Synthetic captions of every level and language (a seed no training or held-out set uses)."""
    return [text for i in range(n) for text in synth.captions(synth.scene_of(seed, i)).values()]


def tiny_base(
    arch: Qwen2VLArch = Qwen2VLArch(), seed: int = 0, max_pixels: int = 1024 * 1024, root: Path | None = None
) -> Path:
    """The folder of a tiny random Qwen2-VL with a tokenizer that knows the synthetic vocabulary."""
    spec = {
        "version": BASE_VERSION,
        "tiny": TINY_QWEN2VL_VERSION,
        "arch": asdict(arch),
        "seed": seed,
        "max_pixels": max_pixels,
    }
    tag = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
    mark = {"kind": "tiny-captioner-base", **spec}
    return cached(
        f"tiny-captioner-base-{tag}",
        lambda p: build_qwen2vl(p, seed, arch, caption_corpus(), max_pixels, mark, zh_words()),
        root,
    )


def resolve_base(init: str, arch: Qwen2VLArch, seed: int = 0) -> str:
    """`tiny` -> the tiny base folder; a local folder -> its absolute path; anything else: a hub id."""
    if init == "tiny":
        return str(tiny_base(arch, seed))
    p = Path(init).expanduser()
    return str(p.resolve()) if p.exists() else init
