"""train.tiny_trained: the folder, build and command line every recipe-trained tiny model shares, on a stand-in
training (the real ones, train.tiny_clip and train.tiny_vae, take minutes; their own tests train them)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from train.tiny_trained import TrainedTiny
from unicap.tiny_build import DONE_MARK


@dataclass(frozen=True)
class Recipe:
    steps: int = 3
    sizes: tuple[int, ...] = (4, 8)


def stand_in_training(out: Path, recipe: Recipe, log) -> dict:
    log(f"[stand-in] step {recipe.steps}/{recipe.steps}")
    (out / "weights.txt").write_text(str(recipe.sizes))
    return {"final_loss": 0.5}


TINY = TrainedTiny("tiny-stand-in", "1", Recipe(), "tests.stand_in")


def test_a_recipe_builds_once_into_its_own_folder(tmp_path, capsys):
    tiny = TINY
    assert tiny.find(root=tmp_path) is None
    built = []

    def train(out: Path, log) -> dict:
        built.append(out)
        return stand_in_training(out, tiny.recipe, log)

    folder = tiny.build(tiny.recipe, tmp_path, train)
    assert folder == tmp_path / tiny.folder_name() and tiny.find(root=tmp_path) == folder
    assert "[stand-in] step 3/3" in capsys.readouterr().err  # the training's log goes to stderr
    mark = json.loads((folder / DONE_MARK).read_text())
    assert mark == {"kind": "tiny-stand-in", "version": "1", "recipe": {"steps": 3, "sizes": [4, 8]}, "final_loss": 0.5}
    assert tiny.build(tiny.recipe, tmp_path, train) == folder and len(built) == 1  # cached: not trained again
    other = Recipe(steps=4)
    assert tiny.folder_name(other) != tiny.folder_name() and tiny.find(other, tmp_path) is None
    assert TrainedTiny("tiny-stand-in", "2", Recipe(), "m").folder_name() != tiny.folder_name()  # the version


def test_the_command_line(tmp_path, capsys, monkeypatch):
    tiny = TINY
    monkeypatch.setenv("UNICAP_CACHE", str(tmp_path))
    seen = []

    def build(recipe: Recipe, **options) -> Path:
        seen.append((recipe, options))
        return tiny.build(recipe, None, lambda out, log: stand_in_training(out, recipe, log))

    assert tiny.main(["--no-train", "steps=5"], "doc", build) == 1
    assert (
        "no tiny-stand-in shipped or cached for this recipe: run `python -m tests.stand_in`" in capsys.readouterr().err
    )
    assert tiny.main(["steps=5", "sizes=[2]"], "doc", build, threads=True) == 0
    assert seen == [(Recipe(steps=5, sizes=(2,)), {"threads": None})]
    path = capsys.readouterr().out.strip()
    assert path.endswith(tiny.folder_name(Recipe(steps=5, sizes=(2,))))
    assert tiny.main(["--no-train", "steps=5", "sizes=[2]"], "doc", build) == 0 and len(seen) == 1
    assert capsys.readouterr().out.strip() == path
