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
import os
import shlex
import subprocess
import sys
from pathlib import Path

from train.captioner.config import load as load_config
from unicap import runtime

MODULE = "train.captioner.trainer"


def launcher_command(args: argparse.Namespace, trainer_args: list[str]) -> list[str]:
    bindir = Path(sys.executable).parent
    port = runtime.master_port(args.master_port, 2 if args.hostfile else args.nnodes, 29510)
    if args.hostfile:
        return [str(bindir / "deepspeed"), "--hostfile", args.hostfile, "--num_gpus", str(args.nproc),
                "--master_addr", args.master_addr, "--master_port", str(port),
                "--module", MODULE, *trainer_args]  # fmt: skip
    return [str(bindir / "torchrun"), "--nnodes", str(args.nnodes), "--node_rank", str(args.node_rank),
            "--nproc_per_node", str(args.nproc), "--master_addr", args.master_addr,
            "--master_port", str(port), "-m", MODULE, *trainer_args]  # fmt: skip


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="a YAML file (train/configs/captioner_*.yaml)")
    p.add_argument("--nproc", type=int, default=1, help="ranks per node (default 1)")
    p.add_argument("--hostfile", default=None, help="several nodes: a DeepSpeed hostfile")
    p.add_argument("--nnodes", type=int, default=1, help="launchers started per node (torchrun)")
    p.add_argument("--node-rank", type=int, default=0)
    p.add_argument("--master-addr", default="127.0.0.1")
    p.add_argument(
        "--master-port",
        type=int,
        default=None,
        help="default: 29510 with --hostfile or --nnodes > 1, else a free port",
    )
    p.add_argument("--dry-run", action="store_true", help="print the launch command only")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. run.steps=50 optim.lr=1e-5")


def run(args: argparse.Namespace) -> int:
    try:
        load_config(args.config, args.overrides)  # a bad config fails here, before any rank starts
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cmd = launcher_command(args, [*(["--config", args.config] if args.config else []), *args.overrides])
    print("[launch] " + shlex.join(cmd), flush=True)
    if args.dry_run:
        return 0
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])),
    }
    env.setdefault("DS_ACCELERATOR", "cpu" if not _has_cuda() else "cuda")
    return subprocess.call(cmd, env=env)


def _has_cuda() -> bool:
    from unicap import runtime

    return runtime.has_cuda()


if __name__ == "__main__":
    from unicap.cli import module_main

    sys.exit(module_main("train.captioner.launch"))
