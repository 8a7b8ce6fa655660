import argparse
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from unicap.cli import COMMANDS

UNICAP = str(Path(sys.executable).with_name("unicap"))


def test_help_lists_every_subcommand_and_each_has_help():
    out = subprocess.run([UNICAP, "--help"], capture_output=True, text=True, check=True).stdout
    assert all(name in out for name in COMMANDS), out
    # every subcommand's --help at once (each is its own Python start-up): the same checks, in half the wall time
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    helps = {name: subprocess.Popen([UNICAP, name, "--help"], **pipes) for name in COMMANDS}
    for name, proc in helps.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0 and "usage: unicap " + name in stdout, (name, stderr)


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
    argv = "--input in --output out --levels short,tags --max-tokens short=9 --max-pixels 4096".split()
    job = config.from_args(CaptionJobConfig, _parse("pipelines.caption", argv))
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


def _shards(tmp_path: Path) -> Path:
    from datagen.synth import synth

    out = tmp_path / "shards"
    synth(str(out), 4, seed=1, shard_size=4)
    return out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--max-retries", "-1"], "--max-retries must be"),
        (["--batch-size", "0"], "--batch-size must be"),
        (["--concurrency", "0"], "--concurrency must be"),
        (["--levels", "long,poem"], "unknown level 'poem'"),
        (["--languages", "en,xx"], "unknown language 'xx'"),
        (["--timeout", "0"], "--timeout must be"),
        (["--server", "ftp://127.0.0.1:8000"], "--server must be"),
        (["--input", "{tmp}/missing"], "is not a folder of image shards"),
        (["--input", "{tmp}/empty"], "holds no complete shard"),
        (["--output", "{tmp}/theirs"], "'thesis.tex'"),
        (["--output", "{shards}"], "that caption does not write"),
    ],
)
def test_caption_user_errors_are_one_line_exit_2_before_ray_starts(extra, message, tmp_path, capsys, monkeypatch):
    import ray

    from unicap import runtime
    from unicap.cli import main

    started = []  # (another test's session Ray may be up already: record calls rather than the state)
    monkeypatch.setattr(runtime, "init_ray", lambda *a, **k: started.append("runtime.init_ray"))
    monkeypatch.setattr(ray, "init", lambda *a, **k: started.append("ray.init"))

    shards = _shards(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "thesis.tex").write_text("a user's file")
    argv = ["caption", "--input", str(shards), "--output", str(tmp_path / "captions"), "--model", "tiny", *extra]
    argv = [a.format(tmp=tmp_path, shards=shards) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("unicap caption: error: ") and message in err and err.count("\n") == 1, err
    assert started == [] and not (tmp_path / "captions").exists()


def test_user_errors_from_the_command_line_and_unicap_debug(tmp_path):
    argv = [UNICAP, "ingest-folder", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]
    r = subprocess.run(argv, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("unicap ingest-folder: error: ") and "Traceback" not in r.stderr
    r = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "UNICAP_DEBUG": "1"})
    assert r.returncode == 1 and "Traceback" in r.stderr and "NotADirectoryError" in r.stderr
    argv = [sys.executable, "-m", "pipelines.caption", "--input", str(tmp_path), "--output", str(tmp_path / "c")]
    repo = Path(__file__).resolve().parents[1]
    r = subprocess.run([*argv, "--batch-size", "0"], capture_output=True, text=True, cwd=repo)
    assert r.returncode == 2 and "--batch-size must be" in r.stderr and "Traceback" not in r.stderr
