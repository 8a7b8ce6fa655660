"""The trainer with its packed stage and run folder in object storage, against the same on a local disk.

    .venv/bin/python bench/bench_train_storage.py [--rounds 3] [--images 1024] [--resolution 64]

A real S3-compatible server (tests.s3_server: moto's server mode on a local port) runs in this process; every leg
runs in a fresh child process that talks to it over HTTP, as a trainer talks to a bucket. Legs are interleaved,
one of each per round; ratios are taken within a round and reported as median, min and max (bench._results.spread).

- loader: train.data.make_loader over a synthetic stage packed by the real pack job (--images at --resolution,
  the demo stage1's 64 px by default), micro-batch 8, 2 workers, read for 1 + --warm-epochs epochs:
    local    data.packed a local folder
    bucket   data.packed = s3://bench/packed, an empty data.cache_dir: epoch 0 fetches every packed file (cold),
             the epochs after it read the node-local cache (warm: the "second pass, same cache_dir")
  Samples/s of each epoch, timed from asking for its first batch to receiving its last (epoch 0's includes the
  workers' start-up, in both legs). Ratios cold / local (epoch 0 against epoch 0) and warm / local (the later
  epochs against the same epochs). Goals: warm >= 0.9x local; cold >= 3x what the demo's stage1 consumes
  (global batch / s per step of bench/results/step_levers.json's "both" leg: `make stage1`'s config, 2 ranks).
- requests: the server's count of every request of the bucket leg, by (method, kind, file type), at start-up
  (make_loader: one listing, _pack.json, the indexes' bucket columns), in epoch 0 and in each warm epoch; per
  packed file (a tar and its index). Expected: a GET per tar and per index in epoch 0, nothing after; none per
  sample.
- checkpoint: a checkpoint folder as train.checkpoint writes one (model, EMA and AdamW moments of --ckpt-model as
  safetensors, and a state.json): RunStore.publish_checkpoint to s3://bench/runs (upload, state.json last, prune
  to keep_last) and RunStore.fetch of it into an emptied working copy (the download a resume makes), against
  shutil.copytree of the folder on the local disk; and the safetensors write itself (what a save costs anyway).

Results: bench/results/train_storage.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import _data  # noqa: E402
from bench._results import save, spread  # noqa: E402

BUCKET = "bench"
PACKED_URI = f"s3://{BUCKET}/packed"
RUNS_URI = f"s3://{BUCKET}/runs"
STEP_LEVERS = ROOT / "bench" / "results" / "step_levers.json"
STAGE1_CONFIG = ROOT / "train" / "configs" / "stage1_cpu.yaml"


# ---------------------------------------------------------------- children: a leg, paused at each mark


def mark(name: str, **fields) -> None:
    """(child) Tell the parent that NAME is done (it reads the server's counts then) and wait for it to answer."""
    print(json.dumps({"mark": name, **fields}), flush=True)
    sys.stdin.readline()


def loader_leg(packed: str, cache_dir: str | None, args) -> None:
    """(child) make_loader over PACKED, then 1 + warm_epochs epochs, a mark after start-up and after each epoch."""
    from train.config import DataConfig
    from train.data import make_loader

    cfg = DataConfig(
        packed=packed,
        resolution=args.resolution,
        micro_batch=args.micro_batch,
        num_workers=args.workers,
        cache_dir=cache_dir,
    )
    t0 = time.perf_counter()
    loader = make_loader(cfg, seed=0, rank=0, world_size=1)
    batches = loader.sampler.planner.batches_per_epoch
    mark("startup", seconds=round(time.perf_counter() - t0, 3), batches=batches)
    it = iter(loader)
    for epoch in range(1 + args.warm_epochs):
        t0, samples, skipped = time.perf_counter(), 0, 0
        for _ in range(batches):
            batch = next(it)
            samples, skipped = samples + len(batch["keys"]), skipped + batch["skipped"]
        mark(f"epoch {epoch}", seconds=round(time.perf_counter() - t0, 3), samples=samples, skipped=skipped)


def checkpoint_leg(folder: Path, work: Path, step: int, order: list[str]) -> None:
    """(child) Each op of ORDER once on the checkpoint FOLDER, a mark after each: write (its safetensors and
    state.json, written again), copy (shutil.copytree on the local disk), publish (RunStore.publish_checkpoint as
    step STEP), fetch (RunStore.fetch of that step into an emptied working copy)."""
    from safetensors.torch import load_file, save_file

    from train.run_store import RunStore
    from unicap import storage
    from unicap.contract import checkpoint as contract

    os.environ["UNICAP_CACHE"] = str(work / "cache")
    store = RunStore(RUNS_URI, "stage1")
    local = work / "run" / contract.CHECKPOINTS_DIR / contract.step_dir_name(step)
    shutil.copytree(folder, local)
    tensors = {f.name: load_file(f) for f in sorted(folder.glob("*.safetensors"))}

    def write() -> None:
        out = work / "write"
        out.mkdir()
        for name, t in tensors.items():
            save_file(t, str(out / name))
        shutil.copy(folder / contract.STATE_FILE, out / contract.STATE_FILE)

    def fetch() -> None:
        shutil.rmtree(store.local, ignore_errors=True)  # a fresh node: nothing of the run here yet
        resume = storage.resolve(f"{RUNS_URI}/stage1/{contract.CHECKPOINTS_DIR}/{local.name}")
        got, _ = store.fetch(resume, None)
        assert (got / contract.STATE_FILE).is_file(), got

    ops = {
        "write": write,
        "copy": lambda: shutil.copytree(local, work / "copy" / local.name),
        "publish": lambda: store.publish_checkpoint(local, keep_last=3),
        "fetch": fetch,
    }
    for op in order:
        t0 = time.perf_counter()
        ops[op]()
        mark(op, seconds=round(time.perf_counter() - t0, 4))


# ---------------------------------------------------------------- the parent: data, server, legs


class RequestsByFile:
    """WSGI middleware in front of the server's own counter: requests by (method, kind, file type) of the key."""

    def __init__(self, app):
        from tests.s3_server import request_kind

        self.app, self.kind, self.counts = app, request_kind, Counter()

    def __call__(self, environ, start_response):
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        suffix = path.rsplit(".", 1)[-1] if "." in path.rsplit("/", 1)[-1] else "-"
        self.counts[method, self.kind(method, path, environ.get("QUERY_STRING", "")), suffix] += 1
        return self.app(environ, start_response)

    def take(self) -> dict[str, int]:
        """The counts since the last take, as {"GET get tar": n, ...} (the server's threads only add to them)."""
        counts, self.counts = self.counts, Counter()
        return {" ".join(k): n for k, n in sorted(counts.items())}


def start_server():
    """moto's server on a free port, with the bucket, its AWS_* variables in os.environ, and a per-file counter."""
    from tests.s3_server import S3Server
    from unicap import storage

    server = S3Server()
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION"):
        os.environ.pop(name, None)
    os.environ.update(server.env)
    storage.clear_filesystem_cache()
    server.client().create_bucket(Bucket=BUCKET)
    # S3Server counts by wrapping moto's werkzeug app (its _server._server.app); wrap that once more, by file type
    werkzeug = server._server._server
    counter = RequestsByFile(werkzeug.app)
    werkzeug.app = counter
    return server, counter


def upload_stage(packdir: Path) -> int:
    """The packed stage's files into PACKED_URI; the number of packed files (tar + index pairs)."""
    import pyarrow.fs as pafs

    from unicap import storage
    from unicap.contract import packed

    dst = storage.resolve(PACKED_URI)
    pafs.copy_files(str(packdir), dst.path, pafs.LocalFileSystem(), dst.fs)
    return len(json.loads((packdir / packed.PACK_META).read_text())["shards"])


def make_checkpoint(folder: Path, model_name: str) -> dict:
    """A checkpoint folder of MODEL_NAME as train.checkpoint writes one: model, ema and optimizer safetensors
    (random fp32 tensors of the model's parameter shapes) and a valid state.json. Its files and bytes."""
    import torch
    from safetensors.torch import save_file

    from train.model import NextDiT, NextDiT_configs
    from unicap.contract import checkpoint as contract

    cfg = NextDiT_configs[model_name]
    params = {n: p.detach() for n, p in NextDiT(cfg).named_parameters()}
    g = torch.Generator().manual_seed(0)
    model = {n: torch.randn(p.shape, generator=g) for n, p in params.items()}
    moments = {
        f"{k}.{n}": torch.rand(t.shape, generator=g) for k in ("exp_avg", "exp_avg_sq") for n, t in model.items()
    }
    ema = {n: t + 0.01 for n, t in model.items()}
    files = {contract.MODEL_FILE: model, contract.EMA_FILE: ema, contract.OPTIMIZER_FILE: moments}
    folder.mkdir(parents=True, exist_ok=True)
    for name, tensors in files.items():
        save_file(tensors, str(folder / name))
    state = {
        "version": contract.CHECKPOINT_VERSION,
        "stage": "stage1",
        "step": 300,
        "batches_consumed": 2400,
        "samples_seen": 2400,
        "skipped_samples": 0,
        "skipped_steps": 0,
        "world_size": 2,
        "zero_stage": 2,
        "model_config": {"name": model_name},
        "text_encoder": "tiny-clip",
        "vae": "tiny-trained",
        "config": {},
    }
    (folder / contract.STATE_FILE).write_text(json.dumps(contract.validate_state(state), indent=1))
    nbytes = sum(f.stat().st_size for f in folder.iterdir())
    return {"model": model_name, "parameters": sum(p.numel() for p in params.values()), "mb": round(nbytes / 1e6, 1)}


def run_leg(child_args: list[str], counter: RequestsByFile, log: Path) -> dict[str, dict]:
    """This script's --child leg in a fresh process: {mark: its fields + the requests the server saw since the
    previous mark}. The child waits at each mark until the counts are taken."""
    counter.take()  # nothing of the previous leg is counted here
    cmd = [sys.executable, __file__, "--child", *child_args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    marks: dict[str, dict] = {}
    with open(log, "a") as err:
        pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": err}
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, text=True, **pipes)
        for line in proc.stdout:
            if not line.startswith('{"mark"'):
                continue
            fields = json.loads(line)
            marks[fields.pop("mark")] = {**fields, "requests": counter.take()}
            proc.stdin.write("\n")
            proc.stdin.flush()
        proc.stdin.close()
        if proc.wait():
            raise RuntimeError(f"{' '.join(child_args)} failed (exit {proc.returncode}): see {log}")
    return marks


def stage1_consumption() -> dict:
    """Samples/s the demo's stage1 trains at: its global batch (train/configs/stage1_cpu.yaml) over the median s per
    step of bench/results/step_levers.json's "both" leg (that config's levers, 2 ranks, measured on 2 cores)."""
    import yaml

    global_batch = yaml.safe_load(STAGE1_CONFIG.read_text())["data"]["global_batch"]
    levers = json.loads(STEP_LEVERS.read_text())
    s_per_step = statistics.median(r["both"]["s_per_step"] for r in levers["rounds"])
    return {
        "source": "bench/results/step_levers.json, leg 'both' (train/configs/stage1_cpu.yaml, 2 ranks)",
        "measured_on": f"{levers['cores']} cores, {levers['precision']}",
        "global_batch": global_batch,
        "s_per_step": round(s_per_step, 3),
        "samples_per_s": round(global_batch / s_per_step, 1),
    }


def epoch_rates(marks: dict) -> list[float]:
    """Samples/s of each epoch of a loader leg, in order."""
    epochs = [m for name, m in marks.items() if name.startswith("epoch ")]
    return [round(m["samples"] / m["seconds"], 1) for m in epochs]


def per_file(requests: dict[str, int], files: int) -> dict[str, float]:
    return {k: round(n / files, 2) for k, n in requests.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--shard-size", type=int, default=128, help="images per packed file")
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--warm-epochs", type=int, default=6)
    ap.add_argument("--ckpt-model", default="NextDiT_tiny")
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "unicap-bench-train-storage"))
    ap.add_argument("--out", default="bench/results/train_storage.json")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        leg, *rest = args.child
        if leg == "loader":
            loader_leg(rest[0], rest[1] if len(rest) > 1 else None, args)
        else:
            checkpoint_leg(Path(rest[0]), Path(rest[1]), int(rest[2]), rest[3].split(","))
        return 0

    t_start = time.time()
    workdir = Path(args.workdir)
    data = workdir / f"synth_{args.images}"
    packdir = workdir / f"packed_{args.images}_{args.resolution}_{args.shard_size}"
    _data.packed_synth_stage(data, packdir, args.images, seed=5, shard_size=args.shard_size, resolution=args.resolution)
    ckpt = workdir / f"ckpt_{args.ckpt_model}"
    shutil.rmtree(ckpt, ignore_errors=True)
    ckpt_info = make_checkpoint(ckpt, args.ckpt_model)
    server, counter = start_server()
    files = upload_stage(packdir)
    runs = workdir / "runs"  # each leg's scratch: caches, copies, logs
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir()
    log = runs / "children.log"
    loader = {"local": [], "bucket": []}
    ckpt_runs = []
    ops = ["write", "copy", "publish", "fetch"]  # fetch downloads what publish uploaded: it comes after it
    for r in range(args.rounds):  # interleaved; the order within a round turns each round
        legs = ["local", "bucket"] if r % 2 == 0 else ["bucket", "local"]
        for where in legs:
            child = ["loader", str(packdir)] if where == "local" else ["loader", PACKED_URI, str(runs / f"cache-{r}")]
            loader[where].append(run_leg(child + _loader_flags(args), counter, log))
        order = ops if r % 2 == 0 else ["publish", "fetch", "copy", "write"]
        work = runs / f"ckpt-{r}"
        ckpt_runs.append(run_leg(["checkpoint", str(ckpt), str(work), str(r + 1), ",".join(order)], counter, log))
        shutil.rmtree(work, ignore_errors=True)
    server.stop()

    def rate(m: dict, epochs: range) -> float:
        return sum(m[f"epoch {e}"]["samples"] for e in epochs) / sum(m[f"epoch {e}"]["seconds"] for e in epochs)

    cold, warm = range(1), range(1, 1 + args.warm_epochs)
    pairs = list(zip(loader["local"], loader["bucket"], strict=True))
    samples = {
        f"{where} {name}": spread([rate(m, epochs) for m in loader[where]], 1)
        for where in ("local", "bucket")
        for name, epochs in (("epoch 0", cold), ("later epochs", warm))
    }
    consumption = stage1_consumption()
    first = loader["bucket"][0]
    requests = {
        "packed_files": files,
        "startup": first["startup"]["requests"],
        "epoch 0 (cold)": first["epoch 0"]["requests"],
        **{f"epoch {e} (warm)": first[f"epoch {e}"]["requests"] for e in warm},
        "epoch 0 per packed file": per_file(first["epoch 0"]["requests"], files),
        "same in every round": all(
            {k: v["requests"] for k, v in m.items()} == {k: v["requests"] for k, v in first.items()}
            for m in loader["bucket"]
        ),
        "skipped samples": sum(e.get("skipped", 0) for m in loader["bucket"] for e in m.values()),
    }
    cold_rates = [rate(b, cold) for b in loader["bucket"]]
    results = {
        "machine": f"{os.cpu_count()} cores",
        "rounds": args.rounds,
        "stage": {
            "images": args.images,
            "resolution": args.resolution,
            "packed_files": files,
            "mb": round(sum(f.stat().st_size for f in packdir.rglob("*") if f.is_file()) / 1e6, 2),
            "micro_batch": args.micro_batch,
            "workers": args.workers,
            "batches_per_epoch": first["startup"]["batches"],
            "warm_epochs": args.warm_epochs,
        },
        "loader": {
            "samples_per_s": samples,
            "startup_s": {w: spread([m["startup"]["seconds"] for m in loader[w]]) for w in loader},
            "cold_over_local": spread([rate(b, cold) / rate(lo, cold) for lo, b in pairs]),
            "warm_over_local": spread([rate(b, warm) / rate(lo, warm) for lo, b in pairs]),
            "demo_stage1_consumption": consumption,
            "cold_over_stage1_consumption": spread([c / consumption["samples_per_s"] for c in cold_rates], 1),
            "goals": {"warm_over_local": ">= 0.9", "cold_over_stage1_consumption": ">= 3"},
        },
        "requests": requests,
        "checkpoint": {
            **ckpt_info,
            "seconds": {op: spread([c[op]["seconds"] for c in ckpt_runs]) for op in ops},
            "publish_over_copy": spread([c["publish"]["seconds"] / c["copy"]["seconds"] for c in ckpt_runs]),
            "fetch_over_copy": spread([c["fetch"]["seconds"] / c["copy"]["seconds"] for c in ckpt_runs]),
            "publish_over_write": spread([c["publish"]["seconds"] / c["write"]["seconds"] for c in ckpt_runs]),
            "publish_mb_per_s": spread([ckpt_info["mb"] / c["publish"]["seconds"] for c in ckpt_runs], 1),
            "fetch_mb_per_s": spread([ckpt_info["mb"] / c["fetch"]["seconds"] for c in ckpt_runs], 1),
            "requests": {op: ckpt_runs[-1][op]["requests"] for op in ("publish", "fetch")},
        },
        "per_round": [  # samples/s of each epoch (0: cold in the bucket leg), requests, checkpoint ops
            {
                "local": epoch_rates(lo),
                "bucket": epoch_rates(b),
                "bucket_requests": {mark: m["requests"] for mark, m in b.items() if m["requests"]},
                "checkpoint_s": {op: c[op]["seconds"] for op in ops},
            }
            for lo, b, c in zip(loader["local"], loader["bucket"], ckpt_runs, strict=True)
        ],
        "wall_s": round(time.time() - t_start, 1),
    }
    save(results, args.out)
    return 0


def _loader_flags(args) -> list[str]:
    flags = ["--resolution", str(args.resolution), "--micro-batch", str(args.micro_batch)]
    return flags + ["--workers", str(args.workers), "--warm-epochs", str(args.warm_epochs)]


if __name__ == "__main__":
    sys.exit(main())
