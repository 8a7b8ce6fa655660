import subprocess
import sys
from pathlib import Path

import pandas as pd

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
