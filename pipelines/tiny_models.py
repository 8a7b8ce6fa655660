"""`make tiny-models`: the trained tiny models that ship with the repository, built from their recipes.

    python -m pipelines.tiny_models           # train what models/ lacks (in the cache), copy it in, drop stale folders
    python -m pipelines.tiny_models --check   # exit 1, naming each folder that is missing or stale

Each model's folder name carries its recipe's hash (unicap.tiny_build): a changed recipe names a folder that
models/ does not have, so `--check` (and tests/pipelines/test_tiny_models.py) fail until this command is run
and its output committed. Loaders take models/ before the cache (tiny_build.find), so a fresh clone trains
none of them; a recipe override (another hash) still trains into the machine's cache.

What ships, and what each costs to train on 2 cores (the recipes' own files say more):
  captioner  train/configs/captioner_tiny.yaml   the tiny UniCap (Qwen2-VL), ~25 min
  vae        train/tiny_vae.py RECIPE            the FLUX-layout VAE, ~4 min
  clip       train/tiny_clip.py RECIPE           open_clip CLIP on synthetic pairs (scores; the demo's filters)
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from unicap.tiny_build import DONE_MARK, SHIPPED, cache_root


def recipes() -> dict[str, tuple[str, Callable[[Path], Path]]]:
    """kind -> (folder name, build(cache root) -> the trained folder in that cache)."""
    from train import tiny_clip, tiny_vae
    from train.captioner import tiny as tiny_captioner

    return {
        "captioner": (tiny_captioner.folder_name(), lambda root: tiny_captioner.tiny_captioner(root=root)),
        "vae": (tiny_vae.folder_name(), lambda root: tiny_vae.tiny_vae(root=root)),
        "clip": (tiny_clip.folder_name(), lambda root: tiny_clip.tiny_clip(root=root)),
    }


def status(shipped: Path = SHIPPED) -> dict[str, list[str]]:
    """{"missing": [kind: folder], "stale": [folders in models/ no recipe names]}."""
    wanted = {name: kind for kind, (name, _) in recipes().items()}
    present = {p.name for p in shipped.iterdir() if p.is_dir()} if shipped.exists() else set()
    missing = [f"{kind}: {name}" for name, kind in wanted.items() if not (shipped / name / DONE_MARK).exists()]
    return {"missing": missing, "stale": sorted(present - set(wanted))}


def build(shipped: Path = SHIPPED) -> list[str]:
    """Train what models/ lacks into the machine's cache, copy it to models/, remove stale folders; the lines said."""
    said = []
    shipped.mkdir(parents=True, exist_ok=True)
    for kind, (name, train) in recipes().items():
        if (shipped / name / DONE_MARK).exists():
            said.append(f"{kind}: {name} (shipped already)")
            continue
        folder = train(cache_root())  # the cache root given: the build happens there, never into models/
        tmp = shipped / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(folder, tmp)
        tmp.rename(shipped / name)
        mark = json.loads((shipped / name / DONE_MARK).read_text())
        size = sum(f.stat().st_size for f in (shipped / name).iterdir()) / 2**20
        said.append(f"{kind}: {name} trained ({mark.get('train_seconds', 0):.0f}s), {size:.1f} MiB in {shipped}")
    for name in status(shipped)["stale"]:
        shutil.rmtree(shipped / name)
        said.append(f"removed {name}: no recipe names it")
    return said


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="only check that models/ matches the recipes")
    args = p.parse_args(argv)
    if args.check:
        s = status()
        for line in s["missing"]:
            print(f"missing from {SHIPPED}: {line}; run `make tiny-models` and commit models/")
        for name in s["stale"]:
            print(f"stale in {SHIPPED}: {name} (no recipe names it); run `make tiny-models`")
        return 1 if s["missing"] or s["stale"] else 0
    for line in build():
        print(f"[tiny-models] {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
