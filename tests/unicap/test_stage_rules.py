"""Stage rules as a typed config: defaults, files that override them, and every mistake named."""

import pytest

from unicap import config
from unicap.stage_rules import StageRules, load_rules, parse_count, parse_target, requested


def test_defaults_are_the_documented_rules():
    assert config.to_dict(StageRules()) == {
        "stage1": {"min_side": 256, "max_aspect": 4.0, "caption_status": ["ok"], "drop_duplicates": True},
        "stage2": {"min_side": 1024},
        "stage3": {"min_side": None},
        "composite": {
            "clip": 0.5,
            "aesthetic": 0.5,
            "clip_columns": ["clip_long_en", "clip_medium_en", "clip_short_en"],
        },
        "nested": True,
        "memory_limit": "2GB",
    }


def test_a_file_overrides_some_values_and_overrides_win(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text("stage1:\n  min_side: 512\n  caption_status: [ok, partial]\ncomposite:\n  clip: 0.8\n")
    rules = load_rules(str(path), ["composite.aesthetic=0.2", "memory_limit=512 MiB"])
    assert rules.stage1.min_side == 512 and rules.stage1.max_aspect == 4.0  # sections merge with the defaults
    assert rules.stage1.caption_status == ["ok", "partial"]
    assert (rules.composite.clip, rules.composite.aesthetic, rules.memory_limit) == (0.8, 0.2, "512 MiB")
    json_path = tmp_path / "rules.json"
    json_path.write_text('{"stage2": {"min_side": 768}, "nested": false}')
    assert load_rules(str(json_path)).stage2.min_side == 768 and load_rules(str(json_path)).nested is False
    assert load_rules() == StageRules()


@pytest.mark.parametrize(
    "text, message",
    [
        ("stage9: {}", "unknown rule section 'stage9'"),
        ("stage1: {min_sid: 3}", r"stage1: unknown key\(s\) \['min_sid'\]"),
        ("stage1: {min_side: big}", "stage1.min_side: expected an integer"),
        ("stage1: {min_side: -1}", "min_side must be >= 0"),
        ("stage1: {max_aspect: 0.5}", "max_aspect must be >= 1"),
        ("stage1: {caption_status: [ok, fine]}", "caption_status"),
        ("composite: {clip_columns: [clip_long_en, 'aesthetic) OR 1=1 --']}", "not a clip score column"),
        ("composite: {clip_columns: [caption_long_en]}", "not a clip score column"),
        ('memory_limit: "2GB\'; DROP TABLE pool; --"', "memory_limit"),
        ("memory_limit: lots", "memory_limit"),
        ("nested: maybe", "nested: expected true/false"),
    ],
)
def test_mistakes_are_errors_naming_the_rule(tmp_path, text, message):
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_rules(str(path))


def test_targets_and_counts():
    assert parse_target("10M") == ("count", 10_000_000) and parse_target("0.25") == ("fraction", 0.25)
    assert parse_count("2.5k") == 2500 and parse_count(5000) == 5000
    assert requested(("fraction", 0.1), 1234) == 123 and requested(("count", 50), 10) == 50
    with pytest.raises(ValueError, match="not a fraction"):
        parse_count("0.5")
    with pytest.raises(ValueError, match="stage target"):
        parse_target("-3")


def test_the_memory_limit_is_the_process_budget_and_duckdb_gets_a_share():
    assert StageRules().duckdb_memory_limit() == "1400000000B"  # 70% of 2GB: the rest is Python and Arrow
    assert StageRules(memory_limit="1 GiB").duckdb_memory_limit() == f"{int(0.7 * 2**30)}B"
