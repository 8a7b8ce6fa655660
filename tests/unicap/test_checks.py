"""Caption checks: every reason a model's answer is refused, and what passes."""

import pytest

from unicap import checks
from unicap.contract.caption import ERROR_REASONS, error_reason

GOOD = {
    ("long", "en"): "A flat illustration of a red square in the top left corner on a plain white background.",
    ("short", "zh"): "白色背景上的一个红色正方形。",
    ("tags", "en"): "red square, white background, flat illustration",
    ("tags", "zh"): "红色正方形, 白色背景, 扁平插画",
}


@pytest.mark.parametrize("level, language", list(GOOD))
def test_good_captions_pass(level, language):
    assert checks.check_caption(GOOD[level, language], level, language) is None


@pytest.mark.parametrize(
    "text, level, language, finish, reason",
    [
        (None, "long", "en", "stop", "empty_output"),
        ("   \n", "short", "en", "stop", "empty_output"),
        ("", "short", "en", "length", "empty_output"),  # nothing at all is empty, whatever the finish
        ("A red square on a white", "short", "en", "length", "truncated"),
        ("I'm sorry, I can't describe this image.", "long", "en", "stop", "refusal"),
        ("As an AI, I do not see images.", "long", "en", "stop", "refusal"),
        ("抱歉，我无法描述这张图片。", "short", "zh", "stop", "refusal"),
        ("a red square " * 6, "long", "en", "stop", "repetition_loop"),
        ("red " * 9, "short", "en", "stop", "repetition_loop"),
        ("红色红色红色红色红色红色红色红色", "short", "zh", "stop", "repetition_loop"),
        ("A red square on a white background.", "short", "zh", "stop", "wrong_language"),
        ("A red square, 红色正方形.", "short", "en", "stop", "wrong_language"),
        ("A red square.", "short", "ja", "stop", "wrong_language"),
        ("A red square.", "short", "ko", "stop", "wrong_language"),
        (", ; ,", "tags", "en", "stop", "empty_output"),  # no tag left after normalisation
    ],
)
def test_each_failure_has_its_reason(text, level, language, finish, reason):
    err = checks.check_caption(text, level, language, finish)
    assert err is not None and error_reason(err) == reason, err
    assert reason in ERROR_REASONS and ": " in err  # "<reason>: <detail>", as the caption record wants


def test_repetition_needs_a_loop_not_a_repeated_word():
    text = "A red square, a blue square and a green square sit in a row; each square is small."
    assert checks.repetition(text) is None
    assert checks.repetition("one two three " * 3) is None  # three repeats of a 3-gram: below the limit
    # a loop need not start at the beginning
    assert checks.repetition("x " + "one two three " * 4) is not None


def test_language_detection_of_other_scripts():
    assert checks.wrong_language("赤い四角形と白い背景。", "ja") is None
    assert checks.wrong_language("흰색 배경의 빨간 사각형", "ko") is None
    assert checks.wrong_language("Un carré rouge sur fond blanc.", "fr") is None


def test_tags_are_normalised_to_one_line_without_duplicates():
    assert checks.normalise_tags("Red square；white background、Red Square\n- flat illustration.") == (
        "Red square, white background, flat illustration"
    )
    assert checks.clean_caption("  a red square  ", "short") == "a red square"
    assert checks.clean_caption("red, red, blue", "tags") == "red, blue"
