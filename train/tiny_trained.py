"""What every tiny model trained here from a recipe shares (train.tiny_clip, train.tiny_vae): its folder, its
build and its command line.

A recipe is a frozen dataclass of everything that decides the model. Its folder is `<kind>-<hash>` of the recipe
and the build's version (unicap.tiny_build.recipe_tag), so a changed recipe or build trains a new folder instead
of loading a stale one; it is shipped in models/ (`make tiny-models`) or trained once per machine into the cache
(unicap.tiny_build.cached), and marked complete last (DONE_MARK: kind, version, recipe and the training's summary).

    python -m train.tiny_vae              # the folder's path; trains it first if absent
    python -m train.tiny_vae --no-train   # the path if shipped or cached, else exit code 1
    python -m train.tiny_vae steps=200    # a recipe override: another cache entry
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unicap.tiny_build import DONE_MARK, cached, find, recipe_overrides, recipe_tag

Log = Callable[[str], None]
Train = Callable[[Path, Log], dict]  # (folder, log) -> the summary; writes the model's files into the folder


@dataclass(frozen=True)
class TrainedTiny:
    """One kind of tiny model trained from a recipe: names, finds and builds its folders; its command line."""

    kind: str  # the folder name's prefix and the done mark's kind
    version: str  # bump when the build code changes: a new folder is built instead of a stale one loaded
    recipe: Any  # the recipe (a frozen dataclass) where none is given
    module: str  # its command line: python -m <module>

    def folder_name(self, recipe: Any = None) -> str:
        return f"{self.kind}-{recipe_tag(self.version, self._recipe(recipe))}"

    def find(self, recipe: Any = None, root: Path | None = None) -> Path | None:
        """The folder of this recipe shipped in models/ or cached, or None if it was not trained on this machine."""
        return find(self.folder_name(recipe), root)

    def build(self, recipe: Any, root: Path | None, train: Train) -> Path:
        """The folder of this recipe; if neither shipped nor cached, `train` writes it first (one builder per
        machine: unicap.tiny_build.cached), logging to stderr."""

        def build_into(out: Path) -> None:
            summary = train(out, _log)
            done = {"kind": self.kind, "version": self.version, "recipe": dataclasses.asdict(recipe), **summary}
            (out / DONE_MARK).write_text(json.dumps(done))

        return cached(self.folder_name(recipe), build_into, root)

    def main(self, argv: list[str] | None, doc: str, build: Callable[..., Path], *, threads: bool = False) -> int:
        """The command line: the folder's path (built by `build(recipe, ...)` if absent), or with --no-train
        the path if shipped or cached, else exit code 1. threads: a --threads option, passed to `build`."""
        p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--no-train", action="store_true", help="only report the shipped or cached folder")
        if threads:
            threads_help = "torch threads for the training (default: every core)"
            p.add_argument("--threads", type=int, default=None, help=threads_help)
        p.add_argument("overrides", nargs="*", help="key=value overrides of the recipe (a different cache entry)")
        args = p.parse_args(argv)
        recipe = recipe_overrides(self.recipe, args.overrides)
        options = {"threads": args.threads} if threads else {}
        path = self.find(recipe) if args.no_train else build(recipe, **options)
        if path is None:
            print(f"no {self.kind} shipped or cached for this recipe: run `python -m {self.module}`", file=sys.stderr)
            return 1
        print(path)
        return 0

    def _recipe(self, recipe: Any) -> Any:
        return self.recipe if recipe is None else recipe


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
