"""The trained tiny models shipped in models/ (pipelines.tiny_models, `make tiny-models`).

A changed recipe names a folder models/ does not hold: `--check` fails until the models are rebuilt and committed,
so the shipped weights always match their recipes. Loaders take models/ before the machine's cache.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines import tiny_models
from unicap import tiny_build
from unicap.tiny_build import DONE_MARK

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_models_match_their_recipes():
    cmd = [sys.executable, "-m", "pipelines.tiny_models", "--check"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    kinds = tiny_models.recipes()
    assert set(kinds) >= {"captioner", "vae", "clip"}
    for kind, (name, _) in kinds.items():
        mark = json.loads((tiny_build.SHIPPED / name / DONE_MARK).read_text())
        assert mark["kind"].startswith(f"tiny-{kind}"), (kind, mark["kind"])


def test_shipped_models_are_small_and_hold_no_pickle():
    files = [f for f in tiny_build.SHIPPED.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) < 24 * 2**20  # a few MB each, in git
    assert not [f for f in files if f.suffix in (".pt", ".pth", ".bin", ".pkl")]  # weights in safetensors


def test_loaders_take_the_shipped_folder_first(tmp_path, monkeypatch):
    from train import tiny_clip, tiny_vae
    from train.captioner import tiny

    monkeypatch.setenv("UNICAP_CACHE", str(tmp_path))  # an empty cache: nothing trained on this machine
    for folder in (tiny.cached_captioner(), tiny_vae.cached_vae(), tiny_clip.cached_clip()):
        assert folder is not None and folder.parent == tiny_build.SHIPPED, folder

    def build(_):
        raise AssertionError("built although shipped")

    name = tiny_clip.folder_name()
    assert tiny_build.cached(name, build) == tiny_build.SHIPPED / name
    with pytest.raises(AssertionError, match="built although shipped"):  # an explicit root never reads models/
        tiny_build.cached(name, build, root=tmp_path)


def test_status_names_missing_and_stale_folders(tmp_path):
    shipped = tmp_path / "models"
    (shipped / "tiny-vae-0000000000").mkdir(parents=True)  # a recipe that changed since
    s = tiny_models.status(shipped)
    assert s["stale"] == ["tiny-vae-0000000000"]
    assert sorted(line.split(":")[0] for line in s["missing"]) == sorted(tiny_models.recipes())
