"""eval-captions: the parser, the scores on planted errors, and the truth against itself."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from datagen import answer_key, synth
from unicap import eval_captions as ev
from unicap.contract import caption as caption_record

UNICAP = str(Path(sys.executable).with_name("unicap"))


def scene(*objects, background="white", text=None):
    """objects: (size, colour, shape, cell)."""
    return ev.Scene(background, text, tuple(ev.SceneObject(sh, c, s, cell) for s, c, sh, cell in objects))


def row(key="k", **captions):
    return {"key": key, "status": "ok", "error": None, **{f"caption_{c}": t for c, t in captions.items()}}


def metrics(scn, level="short", lang="en", text="", status="ok", error=None):
    r = row(**{f"{level}_{lang}": text}) | {"status": status, "error": error}
    return ev.evaluate([r], {"k": scn}, [level], [lang])["columns"][f"caption_{level}_{lang}"]


def recall(m, kind):
    return m["kinds"][kind]["recall"]


def precision(m, kind):
    return m["kinds"][kind]["precision"]


RED_CIRCLE = scene(("small", "red", "circle", 0))
TWO_GROUPS = scene(("small", "red", "circle", 0), ("large", "blue", "square", 4), ("large", "blue", "square", 8))


def test_the_truth_against_itself_scores_perfectly():
    scenes, rows = {}, []
    for i in range(400):
        s = synth.scene_of(11, i)
        scenes[f"k{i}"] = ev.Scene.from_dict(synth.scene_dict(s))
        rows.append({"key": f"k{i}", "status": "ok", "error": None, **synth.captions(s)})
    m = ev.evaluate(rows, scenes)
    assert m["ok_share"] == 1.0 and m["missing"] == 0
    for col, c in m["columns"].items():
        assert c["present_share"] == 1.0 and c["right_language"] == 1.0, col
        assert c["hallucination"]["instance_rate"] == 0.0 and c["hallucination"]["caption_rate"] == 0.0, col
        for kind, k in c["kinds"].items():
            assert k["recall"] in (1.0, None) and k["precision"] in (1.0, None), (col, kind, k)
            if kind in ev.LEVEL_KINDS[c["level"]] and kind != "word":
                assert k["facts"] > 0, (col, kind)  # measured, not vacuous
    assert m["columns"]["caption_long_en"]["kinds"]["word"]["facts"] > 20
    assert ev.goal_check(m)["met"]


def test_a_wrong_colour_is_a_miss_and_a_hallucination():
    m = metrics(RED_CIRCLE, text="A blue circle on white.")
    assert recall(m, "colour") == 0.0 and recall(m, "object") == 0.0 and recall(m, "shape") == 1.0
    assert precision(m, "object") == 0.0 and recall(m, "background") == 1.0
    assert m["hallucination"] == {
        "objects_mentioned": 1,
        "objects_hallucinated": 1,
        "instance_rate": 1.0,
        "caption_rate": 1.0,
    }


def test_a_missing_object_halves_recall_and_is_no_hallucination():
    m = metrics(TWO_GROUPS, text="A red circle on white.")
    assert recall(m, "object") == 0.5 and recall(m, "colour") == 0.5 and recall(m, "shape") == 0.5
    assert precision(m, "object") == 1.0 and m["hallucination"]["instance_rate"] == 0.0
    # count: (red, circle, 1) stated, (blue, square, 2) not
    assert recall(m, "count") == 0.5 and precision(m, "count") == 1.0


def test_an_invented_shape_is_a_hallucination():
    m = metrics(RED_CIRCLE, text="A red circle and a green triangle on white.")
    assert recall(m, "object") == 1.0 and precision(m, "object") == 0.5
    assert m["hallucination"]["instance_rate"] == 0.5 and m["hallucination"]["caption_rate"] == 1.0
    bare = metrics(RED_CIRCLE, text="A red circle next to a diamond, on white.")  # a shape without a colour
    assert bare["hallucination"]["objects_hallucinated"] == 1


def test_a_wrong_count_misses_the_count_only():
    two = scene(("small", "red", "circle", 0), ("small", "red", "circle", 2))
    m = metrics(two, text="Three red circles on white.")
    assert recall(m, "count") == 0.0 and precision(m, "count") == 0.0
    assert recall(m, "object") == 1.0 and m["hallucination"]["instance_rate"] == 0.0
    assert recall(metrics(two, text="Two red circles on white."), "count") == 1.0
    assert recall(metrics(two, text="2 red circles on white."), "count") == 1.0


def test_chinese_numerals_words_and_digits():
    two = scene(("small", "red", "circle", 0), ("small", "red", "circle", 2))
    for text in ("白色背景上的两个红色圆形。", "白色背景上的二个红色圆形。", "白色背景上的2个红色圆形。"):
        m = metrics(two, lang="zh", text=text)
        assert recall(m, "count") == 1.0 and recall(m, "object") == 1.0 and recall(m, "background") == 1.0, text
    m = metrics(two, lang="zh", text="白色背景上的三个红色圆形。")
    assert recall(m, "count") == 0.0
    # 三角形 is a shape, not the numeral 三
    assert ev.parse("一个蓝色三角形", "zh")["count"] == {("blue", "triangle", 1)}


def test_the_wrong_language_is_counted_and_parsed_as_what_the_column_should_be():
    m = metrics(RED_CIRCLE, lang="zh", text="A red circle on white.")
    assert m["right_language"] == 0.0 and recall(m, "object") == 0.0  # no Chinese mention of anything
    error = "wrong_language: caption_short_zh: Chinese caption with 0% CJK characters"
    failed = metrics(RED_CIRCLE, lang="zh", text=None, status="failed", error=error)
    assert failed["present"] == 0 and failed["right_language"] == 0.0
    assert failed["failures"] == {"wrong_language": 1} and recall(failed, "object") is None


def test_positions_sizes_words_and_synonyms():
    s = scene(
        ("large", "purple", "diamond", 0),
        ("small", "green", "circle", 4),
        background="light grey",
        text="SUN",
    )
    text = (
        "In the top-left corner there is a big violet rhombus; a tiny green dot sits in "
        'the middle. The background is light gray. A sign reads "SUN" along the bottom.'
    )
    m = metrics(s, level="long", text=text)
    for kind in ("object", "size", "position", "background", "word"):
        assert recall(m, kind) == 1.0 and precision(m, kind) == 1.0, kind
    wrong = metrics(
        s,
        level="long",
        text="A large purple diamond at the bottom right and a small green circle at the center.",
    )
    assert recall(wrong, "position") == 0.5 and precision(wrong, "position") == 0.5
    # the word's place ("along the bottom") is not an object position
    said = ev.parse('A red circle on a white background, with the word "CAT" written along the bottom.', "en")
    assert said["position"] == set() and said["word"] == {"CAT"}
    zh = ev.parse("小红色圆形位于画面的左上角和中央。画面底部用大写字母写着单词“CAT”。", "zh")
    assert zh["position"] == {("red", "circle", 0), ("red", "circle", 4)} and zh["word"] == {"CAT"}


def test_levels_are_not_asked_for_what_they_do_not_state():
    m = metrics(RED_CIRCLE, level="short", text="A red circle on white.")
    assert recall(m, "position") is None and recall(m, "size") is None and recall(m, "object") == 1.0


@pytest.fixture(scope="module")
def synth_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("evalset")
    synth.synth(str(out), 24, seed=3, shard_size=12)
    return out


def test_command_line_truth_against_itself_and_a_damaged_copy(synth_set, tmp_path):
    args = ["--captions", str(synth_set / "truth"), "--truth", str(synth_set), "--out", str(tmp_path / "m.json")]
    r = subprocess.run([UNICAP, "eval-captions", *args], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "long_en" in r.stdout and "goal" in r.stdout
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["rows"] == 24 and m["goal"]["met"]
    assert m["columns"]["caption_tags_zh"]["kinds"]["object"]["recall"] == 1.0
    # every short_en caption names a red circle instead of its objects
    df = pd.read_parquet(synth_set / "truth")
    df["caption_short_en"] = "A red circle on white."
    caps = tmp_path / "caps"
    caps.mkdir()
    from unicap.atomic import write_parquet

    write_parquet(caption_record.to_table(df.to_dict("records")), caps / "00000.parquet")
    metrics_ = answer_key.evaluate_folder(caps, synth_set)
    col = metrics_["columns"]["caption_short_en"]
    scenes = answer_key.load_answer_key(synth_set).values()
    truth_has_red_circle = sum(("red", "circle") in ev.facts(s, "short")["object"] for s in scenes)
    assert col["kinds"]["object"]["correct"] == truth_has_red_circle
    assert col["hallucination"]["objects_hallucinated"] == 24 - truth_has_red_circle
    assert not metrics_["goal"]["met"]


def test_a_truth_folder_from_another_synth_version_is_refused(synth_set, tmp_path):
    df = pd.read_parquet(synth_set / "truth")
    df.loc[0, "caption_short_en"] = "Something else."
    truth = tmp_path / "truth"
    truth.mkdir()
    from unicap.atomic import write_parquet

    write_parquet(caption_record.to_table(df.to_dict("records")), truth / "00000.parquet")
    with pytest.raises(answer_key.AnswerKeyError, match="another version"):
        answer_key.load_answer_key(truth)
