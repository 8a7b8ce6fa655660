import argparse
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from unicap.cli import COMMANDS

UNICAP = str(Path(sys.executable).with_name("unicap"))


def test_help_lists_every_subcommand_and_each_has_help():
    out = subprocess.run([UNICAP, "--help"], capture_output=True, text=True, check=True).stdout
    for name in COMMANDS:
        assert name in out
        sub = subprocess.run([UNICAP, name, "--help"], capture_output=True, text=True)
        assert sub.returncode == 0 and "usage: unicap " + name in sub.stdout, sub.stderr


def test_synth_then_validate_from_the_command_line(tmp_path):
    out = tmp_path / "synth"
    r = subprocess.run([UNICAP, "synth", "--n", "64", "--out", str(out)], capture_output=True, text=True, check=True)
    assert "pandas.read_parquet" in r.stdout
    assert len(pd.read_parquet(out / "truth")) == 64
    v = subprocess.run([UNICAP, "validate", str(out / "truth")], capture_output=True, text=True)
    assert v.returncode == 0 and "1/1 files valid, 64 rows" in v.stdout
    (out / "truth" / "broken.parquet").write_bytes((out / "00000.parquet").read_bytes())  # an index, not captions
    v = subprocess.run([UNICAP, "validate", str(out / "truth")], capture_output=True, text=True)
    assert v.returncode == 1 and "INVALID" in v.stdout


def _parse(module: str, argv: list[str]) -> argparse.Namespace:
    import importlib

    p = argparse.ArgumentParser(exit_on_error=False)
    importlib.import_module(module).add_arguments(p)
    return p.parse_args(argv)


def test_job_options_take_their_defaults_from_the_config_dataclasses():
    from pipelines.caption import CaptionJobConfig
    from pipelines.score import ScoreConfig
    from unicap import config
    from unicap.captioner import CaptionConfig
    from unicap.engines import EngineConfig

    job = config.from_args(CaptionJobConfig, _parse("pipelines.caption", ["--input", "in", "--output", "out"]))
    engine, caption = job.configs()
    assert engine == EngineConfig(model=job.model) and caption == CaptionConfig()  # nothing restated
    assert engine.max_pixels == caption.max_pixels == EngineConfig.max_pixels
    job = config.from_args(CaptionJobConfig, _parse("pipelines.caption", [
        "--input", "in", "--output", "out", "--levels", "short,tags", "--max-tokens", "short=9", "--max-pixels", "4096"]))  # fmt: skip
    engine, caption = job.configs()
    assert caption.levels == ("short", "tags") and caption.max_tokens == {"short": 9}
    assert engine.max_pixels == caption.max_pixels == 4096
    args = _parse("pipelines.score", ["--input", "in", "--output", "out", "--no-near-dedup"])
    assert config.from_args(ScoreConfig, args) == ScoreConfig(near_dedup=False)


@pytest.mark.parametrize(
    "module, argv",
    [
        ("pipelines.caption", ["--input", "a", "--output", "b", "--strategy", "fancy"]),
        ("pipelines.caption", ["--input", "a", "--output", "b", "--max-tokens", "long"]),
        ("pipelines.score", ["--input", "a", "--output", "b", "--precision", "fp8"]),
        ("pipelines.stages", ["--scores", "a", "--output", "b", "--threads", "many"]),
    ],
)
def test_bad_options_are_refused_by_the_parser(module, argv):
    with pytest.raises(argparse.ArgumentError):
        _parse(module, argv)


def test_bad_names_are_clear_errors_not_asserts():
    from pipelines.caption import CaptionJobConfig
    from pipelines.score import ScoreConfig
    from unicap import runtime

    with pytest.raises(ValueError, match="without '_'"):
        CaptionJobConfig(input="a", output="b", levels=("long_x",)).configs()
    with pytest.raises(ValueError, match="unknown level"):
        CaptionJobConfig(input="a", output="b", max_tokens={"poem": 3}).configs()
    with pytest.raises(ValueError, match="gpus_per_actor"):
        ScoreConfig(gpus_per_actor=1.5)
    with pytest.raises(ValueError, match="device 'tpu'"):
        runtime.resolve_device("tpu")
