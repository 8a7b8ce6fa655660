"""`unicap train-captioner`: launch the captioner trainer (train.captioner.trainer) with torchrun or deepspeed.

    unicap train-captioner --config train/configs/captioner_tiny.yaml run.out=runs/captioner
    unicap train-captioner --config my.yaml --nproc 8 model.init=Qwen/Qwen2-VL-2B-Instruct \\
        data.source=folder data.captions=data/captions_72b data.shards=data/shards
    unicap train-captioner --config my.yaml --hostfile hosts --nproc 8          # several nodes (deepspeed launcher)

The config is checked before any rank starts; the trainer's output folder (run.out/final) is what
`unicap caption --model` takes.
"""

from __future__ import annotations

import argparse
import sys

from train.captioner.config import load as load_config
from train.launcher import add_launcher_arguments, launch, launcher_command
from unicap import runtime

MODULE = "train.captioner.trainer"
PORT = 29510  # the rendezvous port across nodes (train.launch: 29500)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="a YAML file (train/configs/captioner_*.yaml)")
    add_launcher_arguments(p, nproc=1, port=PORT)
    p.add_argument("--dry-run", action="store_true", help="print the launch command only")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. run.steps=50 optim.lr=1e-5")


def run(args: argparse.Namespace) -> int:
    try:
        load_config(args.config, args.overrides)  # a bad config fails here, before any rank starts
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    config = ["--config", args.config] if args.config else []
    cmd = launcher_command(args, MODULE, PORT, [*config, *args.overrides])
    # DeepSpeed's accelerator where the environment sets none: cuda if torch sees a GPU (no probe for a dry run)
    accelerator = {} if args.dry_run else {"DS_ACCELERATOR": "cuda" if runtime.has_cuda() else "cpu"}
    return launch(cmd, dry_run=args.dry_run, env_defaults=accelerator)


if __name__ == "__main__":
    from unicap.cli import module_main

    sys.exit(module_main("train.captioner.launch"))
