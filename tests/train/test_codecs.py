"""The trainer's text encoder: the caption reaches the model inside the CPU configs' text_max_length."""

import pytest
import torch

from datagen.synth import synth_item
from train.codecs import MIN_CAPTION_TOKENS, TextEncoder, format_prompt, text_encoder
from train.config import load as load_config

CPU_CONFIGS = [f"train/configs/stage{i}_cpu.yaml" for i in (1, 2, 3)]


@pytest.fixture(scope="module")
def tiny_text():
    return TextEncoder("tiny", max_length=128)


def test_every_cpu_config_leaves_room_for_the_longest_synthetic_caption(tiny_text):
    """The system prompt comes first and truncation cuts the end: the tiny tokenizer once split the system
    prompt into 101 tokens, the configs kept 96, and every stage trained without seeing one caption word."""
    tok = tiny_text.tokenizer
    longest = max(len(tok(format_prompt(c))["input_ids"]) for i in range(40) for c in synth_item(0, i)[1].values())
    assert tiny_text.prefix_tokens <= 40  # the system prompt's words are whole tokens
    assert 128 >= longest  # the CPU configs' text_max_length for a Gemma-2-like encoder


@pytest.mark.parametrize("path", CPU_CONFIGS)
def test_the_last_word_of_the_longest_caption_reaches_each_cpu_config(path):
    """Whatever encoder a CPU stage config names, the end of the longest synthetic caption changes its features."""
    cfg = load_config(path, [])
    te = text_encoder(cfg.model.text_encoder, max_length=cfg.model.text_max_length)
    for lang, other in (("en", " purple."), ("zh", "紫色。")):
        longest = max((synth_item(0, i)[1][f"caption_long_{lang}"] for i in range(40)), key=len)
        changed = longest[: -len(other)] + other  # the last characters, another colour
        feats, mask = te([longest, changed])
        n = int(mask[0].sum())
        assert not torch.allclose(feats[0, :n], feats[1, :n]), (path, lang)


def test_captions_that_differ_in_one_word_give_different_features(tiny_text):
    """What the DiT is conditioned on: two long captions differing only in the background colour (a word near
    the start) and in the last object's colour (near the end) must not encode the same."""
    base = synth_item(0, 1)[1]["caption_long_en"]
    words = base.split()
    variants = [base, base.replace(" background", " backgroundx", 1), " ".join([*words[:-2], "purple", words[-1]])]
    feats, mask = tiny_text(variants)
    assert mask.sum(1).tolist()[0] > tiny_text.prefix_tokens + 20  # the caption's tokens are there
    for other in (1, 2):
        n = int(min(mask[0].sum(), mask[other].sum()))
        assert not torch.allclose(feats[0, :n], feats[other, :n]), other


def test_a_max_length_the_system_prompt_fills_is_refused():
    prefix = TextEncoder("tiny", max_length=256).prefix_tokens
    with pytest.raises(ValueError, match="system prompt takes .* raise model.text_max_length"):
        TextEncoder("tiny", max_length=prefix + MIN_CAPTION_TOKENS - 1)
    TextEncoder("tiny", max_length=prefix + MIN_CAPTION_TOKENS)  # exactly enough: accepted
