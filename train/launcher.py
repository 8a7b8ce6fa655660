"""What both trainers' launchers share (train.launch for Next-DiT, train.captioner.launch for the captioner).

One node: torchrun with --nproc ranks (rendezvous on 127.0.0.1 at a free port, or --master-addr with
--nnodes/--node-rank for launchers started per node, e.g. by SLURM). A hostfile: the deepspeed launcher, which
starts the same command on every node over ssh/pdsh. Either way the trainer runs as a module
(`-m train.trainer`), from this checkout (the working directory is put on PYTHONPATH).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import subprocess
import sys
from pathlib import Path

import psutil

from unicap import runtime


def add_launcher_arguments(p: argparse.ArgumentParser, *, nproc: int, port: int) -> None:
    """--nproc (default `nproc`), --hostfile, --nnodes, --node-rank, --master-addr, --master-port (default
    `port` across nodes, else a free one)."""
    port_help = f"default: {port} with --hostfile or --nnodes > 1, else a free port"
    p.add_argument("--nproc", type=int, default=nproc, help=f"ranks per node (default {nproc})")
    p.add_argument("--hostfile", default=None, help="several nodes: a DeepSpeed hostfile (node slots=N per line)")
    p.add_argument("--nnodes", type=int, default=1, help="launchers started per node (torchrun)")
    p.add_argument("--node-rank", type=int, default=0)
    p.add_argument("--master-addr", default="127.0.0.1")
    p.add_argument("--master-port", type=int, default=None, help=port_help)


def launcher_command(args: argparse.Namespace, module: str, port: int, trainer_args: list[str]) -> list[str]:
    """The deepspeed launcher's command (with a hostfile) or torchrun's, running `module` with `trainer_args`."""
    bindir = Path(sys.executable).parent
    master = ["--master_addr", args.master_addr, "--master_port"]
    master.append(str(runtime.master_port(args.master_port, 2 if args.hostfile else args.nnodes, port)))
    if args.hostfile:
        hosts = ["--hostfile", args.hostfile, "--num_gpus", str(args.nproc)]
        return [str(bindir / "deepspeed"), *hosts, *master, "--module", module, *trainer_args]
    ranks = ["--nnodes", str(args.nnodes), "--node_rank", str(args.node_rank), "--nproc_per_node", str(args.nproc)]
    return [str(bindir / "torchrun"), *ranks, *master, "-m", module, *trainer_args]


def launch(cmd: list[str], *, dry_run: bool, env_defaults: dict[str, str] | None = None) -> int:
    """Print the command; unless a dry run, run it and return its exit status. Its environment: this one, with
    the working directory (this checkout) on PYTHONPATH and `env_defaults` for variables not set.

    Nothing of the run outlives it: torchrun starts each rank in a session of its own, and a rank it could not
    stop (a frozen one, or any when torchrun itself is killed) would be left to init; the ranks seen while the
    run was going are killed when the launcher command ends, whatever its exit status."""
    print("[launch] " + shlex.join(cmd), flush=True)
    if dry_run:
        return 0
    pythonpath = os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))
    proc = subprocess.Popen(cmd, env={**(env_defaults or {}), **os.environ, "PYTHONPATH": pythonpath})
    seen: dict[int, psutil.Process] = {}
    try:
        while proc.poll() is None:
            seen |= {p.pid: p for p in _descendants(proc.pid) if p.pid not in seen}
            try:
                proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                pass
    except KeyboardInterrupt:  # Ctrl-C reached torchrun too (same process group): let it stop its ranks
        proc.wait()
    finally:
        left = [p for p in seen.values() if p.is_running()]  # is_running: not a reused pid
        for p in left:
            with contextlib.suppress(psutil.Error):
                p.kill()
        if left:
            print(f"[launch] killed {len(left)} process(es) of the run left running", file=sys.stderr, flush=True)
    return proc.returncode


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []
