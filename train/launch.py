"""`make stage1|stage2|stage3`: pack the stage if needed, then launch the DeepSpeed trainer on it.

    python -m train.launch --stage stage2 --config train/configs/stage2_cpu.yaml --data demo --nproc 2
    python -m train.launch --stage stage1 --config train/configs/stage1_2b.yaml --data /data/unicap \\
        --nproc 8 --hostfile hosts -- optim.lr=1e-4          # several nodes: the deepspeed launcher

A data folder holds `shards/` (or `data/`), `stages/stage{1,2,3}.parquet`, a caption folder, and gets
`packed/<stage>/` (pipelines.pack, at the config's resolution) and `runs/<stage>/` (the trainer's
output). One node: torchrun with --nproc ranks (rendezvous on 127.0.0.1, or --master-addr with
--nnodes/--node-rank for launchers started per node, e.g. by SLURM). A hostfile: the deepspeed launcher,
which starts the same command on every node over ssh/pdsh.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

from train.config import STAGES
from train.config import load as load_config
from unicap import runtime


def first_existing(*paths: Path) -> Path:
    for p in paths:
        if p.exists():
            return p
    return paths[0]


def layout(data: Path, stage: str, captions: str | None) -> dict[str, Path]:
    return {
        "manifest": data / "stages" / f"{stage}.parquet",
        "shards": first_existing(data / "shards", data / "data"),
        "captions": Path(captions)
        if captions
        else first_existing(data / "captions", data / "data" / "truth"),  # the scored and staged captions
        "packed": data / "packed" / stage,
        "runs": data / "runs",
    }


def ensure_packed(paths: dict[str, Path], resolution: int) -> None:
    if not paths["manifest"].is_file():
        raise ValueError(f"no stage manifest {paths['manifest']}: run `unicap stages` (or `make demo`) first")
    from pipelines.pack import pack_stage

    try:
        meta = pack_stage(paths["manifest"], paths["captions"], paths["packed"], shards_dir=paths["shards"],
                          resolution=resolution)  # fmt: skip
    finally:
        import ray

        ray.shutdown()  # the trainer gets the machine
    counts = meta.get("counts", {})
    print(
        f"[pack] {paths['packed']}: {counts.get('status')} (failures {counts.get('failures_by_reason')})",
        flush=True,
    )


def launcher_command(args: argparse.Namespace, trainer_args: list[str]) -> list[str]:
    bindir = Path(sys.executable).parent
    port = runtime.master_port(args.master_port, 2 if args.hostfile else args.nnodes, 29500)
    if args.hostfile:
        return [str(bindir / "deepspeed"), "--hostfile", args.hostfile, "--num_gpus", str(args.nproc),
                "--master_addr", args.master_addr, "--master_port", str(port),
                "--module", "train.trainer", *trainer_args]  # fmt: skip
    return [str(bindir / "torchrun"), "--nnodes", str(args.nnodes), "--node_rank", str(args.node_rank),
            "--nproc_per_node", str(args.nproc), "--master_addr", args.master_addr,
            "--master_port", str(port), "-m", "train.trainer", *trainer_args]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", required=True, choices=STAGES)
    p.add_argument("--config", required=True, help="train/configs/<stage>_cpu.yaml or _2b.yaml")
    p.add_argument("--data", default="demo", help="data folder (stages/, shards/, captions)")
    p.add_argument("--captions", default=None, help="caption folder (default: found under --data)")
    p.add_argument("--nproc", type=int, default=2, help="ranks per node")
    p.add_argument("--hostfile", default=None, help="several nodes: a DeepSpeed hostfile (node slots=N per line)")
    p.add_argument("--nnodes", type=int, default=1, help="launchers started per node (torchrun)")
    p.add_argument("--node-rank", type=int, default=0)
    p.add_argument("--master-addr", default="127.0.0.1")
    p.add_argument(
        "--master-port",
        type=int,
        default=None,
        help="default: 29500 with --hostfile or --nnodes > 1, else a free port",
    )
    p.add_argument("--no-pack", action="store_true", help="the packed folder is ready (e.g. on a shared disk)")
    p.add_argument("--dry-run", action="store_true", help="print the launch command only")
    p.add_argument("overrides", nargs="*", help="key=value trainer config overrides")
    args = p.parse_args(argv)

    data = Path(args.data)
    paths = layout(data, args.stage, args.captions)
    overrides = [f"run.stage={args.stage}", f"data.packed={paths['packed']}", f"run.out={paths['runs']}",
                 *args.overrides]  # fmt: skip
    try:
        cfg = load_config(args.config, overrides)  # fails here, before any pack or launch, on a bad config
        if not args.no_pack and not args.dry_run:
            ensure_packed(paths, cfg.data.resolution)
    except ValueError as e:  # ConfigError, a missing manifest, a refused pack: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    cmd = launcher_command(args, ["--config", args.config, *overrides])
    print("[launch] " + shlex.join(cmd), flush=True)
    if args.dry_run:
        return 0
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])),
    }
    return subprocess.call(cmd, env=env)


if __name__ == "__main__":
    sys.exit(main())
