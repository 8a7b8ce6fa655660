"""The tiny captioner trained on this machine: trained once, cached, reused by the demo, tests and benchmarks.

    python -m train.captioner.tiny              # the folder's path; trains it first if absent (~15 min, 2 cores)
    python -m train.captioner.tiny --no-train   # the path if cached, else exit code 1

The recipe is train/configs/captioner_tiny.yaml; the cache key is the resolved recipe (plus `overrides`, less the
settings that only say where and how fast it runs: NOT_RECIPE), so changing the recipe trains a new model. The
run folder beside the cached model keeps its checkpoints: an interrupted training resumes where it stopped.
Evaluate it at the resolution it was trained at (`max_pixels`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from train.captioner.config import load as load_config
from unicap.tiny_build import DONE_MARK, cache_root, cached, find

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "captioner_tiny.yaml"
TINY_CAPTIONER_VERSION = "1"
# A short version of the recipe (a few minutes on 2 cores): the test suite and `make demo --preset quick` train it,
# and share its cache entry. Its accuracy is far below the full recipe's (see tests/train/captioner/test_tiny.py).
SHORT_RECIPE = ("run.steps=400", "optim.ground_first_steps=100", "data.single_group_until=3200")


# what a run's settings do not change in the model it trains: where and how fast it runs
NOT_RECIPE = (
    "run.out",
    "run.progress",
    "run.threads",
    "run.stop_file",
    "run.term_grace_s",
    "run.collective_timeout_s",
    "run.init_timeout_s",
    "run.max_minutes",
    "run.save_every",
    "run.keep_last",
    "run.log_every",
    "run.resume",
    "data.num_workers",
)


def recipe(config: Path = CONFIG, overrides: tuple[str, ...] = ()) -> dict:
    """The resolved recipe (config + overrides), without the settings in NOT_RECIPE: what the cache key hashes,
    so that a comment or a thread count does not make a new model."""
    from unicap.config import to_dict

    data = to_dict(load_config(config, list(overrides)))
    for key in NOT_RECIPE:
        section, name = key.split(".")
        data[section].pop(name, None)
    return data


def _tag(config: Path, overrides: tuple[str, ...]) -> str:
    text = f"{TINY_CAPTIONER_VERSION}\n{json.dumps(recipe(config, overrides), sort_keys=True)}"
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def cached_captioner(config: Path = CONFIG, overrides: tuple[str, ...] = (), root: Path | None = None) -> Path | None:
    """The folder of this recipe shipped in models/ or cached, or None if it was not trained on this machine yet."""
    return find(folder_name(config, overrides), root)


def folder_name(config: Path = CONFIG, overrides: tuple[str, ...] = ()) -> str:
    return f"tiny-captioner-{_tag(config, overrides)}"


def run_folder(config: Path = CONFIG, overrides: tuple[str, ...] = (), root: Path | None = None) -> Path:
    """Where the recipe trains (checkpoints, metrics.jsonl): an interrupted training resumes from here."""
    return (root or cache_root()) / f"tiny-captioner-{_tag(config, overrides)}.run"


def total_steps(config: Path = CONFIG, overrides: tuple[str, ...] = ()) -> int:
    return load_config(config, list(overrides)).run.steps


def max_pixels(config: Path = CONFIG, overrides: tuple[str, ...] = ()) -> int:
    """The resolution the recipe trains at: give it to `unicap caption --max-pixels`."""
    return load_config(config, list(overrides)).data.max_pixels


def tiny_captioner(
    config: Path = CONFIG,
    overrides: tuple[str, ...] = (),
    root: Path | None = None,
    nproc: int = 1,
    threads: int | None = None,
    threads_until: Path | None = None,
) -> Path:
    """The tiny captioner's model folder, trained (through `unicap train-captioner`'s launcher) if absent.

    threads: torch threads per rank (None: the cores shared among the ranks); with threads_until, only until
    that file exists: the run then stops with a checkpoint (run.stop_file) and resumes with the shared cores.
    Neither is part of the cache key, like run.max_minutes (`make demo` leaves a core to the tiny VAE's
    training beside it, and takes it back when the VAE is done)."""
    name = folder_name(config, overrides)
    run_dir = run_folder(config, overrides, root)
    steps = total_steps(config, overrides)

    def build(tmp: Path) -> None:
        # run.max_minutes=0: the cached model is the whole recipe, whatever the machine's load (the cap is for
        # runs by hand on shared machines); not part of the cache key
        launch = [sys.executable, "-m", "train.captioner.launch", "--config", str(config), "--nproc", str(nproc)]
        cmd = [*launch, f"run.out={run_dir}", *overrides, "run.max_minutes=0"]
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(CONFIG.parents[2]), os.environ.get("PYTHONPATH")])),
        }

        def train(part: list[str]) -> None:
            if subprocess.call(part, env=env) != 0:
                raise RuntimeError(f"training the tiny captioner failed; its run folder {run_dir} resumes on a re-run")

        limited = [f"run.threads={threads}"] if threads else []
        train([*cmd, *limited, *([f"run.stop_file={threads_until}"] if limited and threads_until else [])])
        if limited and threads_until and threads_until.exists() and not _finished(run_dir, steps):
            train(cmd)  # resumes at the first part's checkpoint, with the shared cores
        if not _finished(run_dir, steps):  # stopped by a signal, or by run.max_minutes in an override
            raise RuntimeError(
                f"the tiny captioner stopped before step {steps}: not cached; a re-run resumes from {run_dir}"
            )
        final = run_dir / "final"
        for f in final.iterdir():
            shutil.copy(f, tmp / f.name)
        provenance = json.loads((final / "unicap_captioner.json").read_text())
        trained = {"steps": provenance["step"], "train_seconds": provenance["train_seconds"]}
        mark = {"kind": "tiny-captioner", "version": TINY_CAPTIONER_VERSION, **trained, "overrides": list(overrides)}
        (tmp / DONE_MARK).write_text(json.dumps(mark))

    return cached(name, build, root)


def _finished(run_dir: Path, steps: int) -> bool:
    done = run_dir / "final" / "unicap_captioner.json"
    return done.is_file() and json.loads(done.read_text())["step"] >= steps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--no-train", action="store_true", help="only report the cached folder")
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch threads per rank (default: cores / ranks)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the recipe (a different cache entry)")
    args = p.parse_args(argv)
    overrides = tuple(args.overrides)
    path = (
        cached_captioner(overrides=overrides)
        if args.no_train
        else tiny_captioner(overrides=overrides, nproc=args.nproc, threads=args.threads)
    )
    if path is None:
        print("no tiny captioner cached for this recipe: run `python -m train.captioner.tiny`", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
