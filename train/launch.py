"""`make stage1|stage2|stage3`: pack the stage if needed, then launch the DeepSpeed trainer on it.

    python -m train.launch --stage stage2 --config train/configs/stage2_cpu.yaml --data demo --nproc 2
    python -m train.launch --stage stage1 --config train/configs/stage1_2b.yaml --data /data/unicap \\
        --nproc 8 --hostfile hosts -- optim.lr=1e-4          # several nodes: the deepspeed launcher

A data folder (a local folder, or a URI on a cluster whose nodes share no disk: unicap.storage) holds `shards/`
(or `data/`), `stages/stage{1,2,3}.parquet`, a caption folder, and gets
`packed/<stage>/` (pipelines.pack, at the config's resolution) and `runs/<stage>/` (the trainer's
output). One node: torchrun with --nproc ranks (rendezvous on 127.0.0.1, or --master-addr with
--nnodes/--node-rank for launchers started per node, e.g. by SLURM). A hostfile: the deepspeed launcher,
which starts the same command on every node over ssh/pdsh (train.launcher, shared with the captioner's).
"""

from __future__ import annotations

import argparse
import sys

from train.config import STAGES
from train.config import load as load_config
from train.launcher import add_launcher_arguments, launch, launcher_command
from unicap import storage
from unicap.storage import Location

MODULE = "train.trainer"
PORT = 29500  # the rendezvous port across nodes (train.captioner.launch: 29510)


def first_existing(*locs: Location) -> Location:
    for loc in locs:
        if loc.exists():
            return loc
    return locs[0]


def layout(data: str, stage: str, captions: str | None) -> dict[str, Location]:
    """Where a stage's inputs and outputs are under the data folder DATA (a local folder or a URI)."""
    root = storage.resolve(data)
    if not root.is_local:  # the packed stage and the runs are written there: a missing bucket is one line
        storage.check_writable(root)
    found = first_existing(root.join("captions"), root.join("data", "truth"))  # the scored and staged captions
    return {
        "manifest": root.join("stages", f"{stage}.parquet"),
        "shards": first_existing(root.join("shards"), root.join("data")),
        "captions": storage.resolve(captions) if captions else found,
        "packed": root.join("packed", stage),
        "runs": root.join("runs"),
    }


def ensure_packed(paths: dict[str, Location], resolution: int) -> None:
    if not paths["manifest"].is_file():
        raise ValueError(f"no stage manifest {paths['manifest']}: run `unicap stages` (or `make demo`) first")
    from pipelines.pack import pack_stage

    stage = (paths["manifest"].uri, paths["captions"].uri, paths["packed"].uri)
    try:
        meta = pack_stage(*stage, shards_dir=paths["shards"].uri, resolution=resolution)
    finally:
        import ray

        ray.shutdown()  # the trainer gets the machine
    counts = meta.get("counts", {})
    print(
        f"[pack] {paths['packed']}: {counts.get('status')} (failures {counts.get('failures_by_reason')})",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", required=True, choices=STAGES)
    p.add_argument("--config", required=True, help="train/configs/<stage>_cpu.yaml or _2b.yaml")
    p.add_argument("--data", default="demo", help="data folder (stages/, shards/, captions): a path or a URI")
    p.add_argument("--captions", default=None, help="caption folder (default: found under --data)")
    add_launcher_arguments(p, nproc=2, port=PORT)
    p.add_argument("--no-pack", action="store_true", help="the packed folder is ready (e.g. on a shared disk)")
    p.add_argument("--dry-run", action="store_true", help="print the launch command only")
    p.add_argument("overrides", nargs="*", help="key=value trainer config overrides")
    args = p.parse_args(argv)

    try:
        paths = layout(args.data, args.stage, args.captions)  # a missing bucket or credentials: one line
        stage_paths = [f"run.stage={args.stage}", f"data.packed={paths['packed'].uri}", f"run.out={paths['runs'].uri}"]
        overrides = [*stage_paths, *args.overrides]
        cfg = load_config(args.config, overrides)  # fails here, before any pack or launch, on a bad config
        if not args.no_pack and not args.dry_run:
            ensure_packed(paths, cfg.data.resolution)
    except ValueError as e:  # ConfigError, a missing manifest, a refused pack: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    cmd = launcher_command(args, MODULE, PORT, ["--config", args.config, *overrides])
    return launch(cmd, dry_run=args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
