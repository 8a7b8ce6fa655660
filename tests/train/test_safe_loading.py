"""Weights from users' files are never unpickled: a crafted checkpoint cannot run code when loaded."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest

UNICAP = str(Path(sys.executable).with_name("unicap"))


class _Payload:
    """Unpickling this runs `touch MARKER` (what a hostile checkpoint would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (__import__("os").system, (f"touch {self.marker}",))


@pytest.fixture
def hostile_checkpoint(tmp_path) -> tuple[Path, Path]:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"config": {}, "model": _Payload(marker)}))
    # sanity: the file does run code when unpickled the unsafe way
    probe = tmp_path / "probe"
    unpickle = [sys.executable, "-c", "import pickle,sys; pickle.load(open(sys.argv[1],'rb'))", str(path)]
    subprocess.run(unpickle, check=False, capture_output=True)
    assert marker.exists()
    marker.unlink()
    assert not probe.exists()
    return path, marker


def test_convert_refuses_a_pickled_payload(hostile_checkpoint, tmp_path):
    path, marker = hostile_checkpoint
    cmd = [sys.executable, "-m", "train.convert", "--to", "diffusers", str(path), str(tmp_path / "out")]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode != 0
    assert "weights_only" in r.stderr or "Unsupported" in r.stderr or "WeightsUnpickler" in r.stderr, r.stderr[-2000:]
    assert not marker.exists()


def test_sample_refuses_a_file_that_is_not_a_weights_folder(hostile_checkpoint, tmp_path):
    path, marker = hostile_checkpoint
    cmd = [UNICAP, "sample", "--ckpt", str(path), "--prompt", "x", "--out", str(tmp_path / "s")]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode != 0 and "not a complete checkpoint" in r.stderr, r.stderr[-2000:]
    assert not marker.exists()
