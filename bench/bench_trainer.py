"""The trainer's overhead and its appetite: DeepSpeed step vs a plain PyTorch loop, loader vs consumption.

    .venv/bin/python bench/bench_trainer.py [--rounds 3] [--steps 6] [--resolution 128] [--micro 8]
    python bench/bench_trainer.py --device cuda --model 2b-width --resolution 256 --micro 32 \
        --packed .cache/gpu_check/data/packed          # on a GPU (make gpu-check runs it): + MFU of each leg

One process, one rank (started under torchrun by itself), legs interleaved per round, median ratio and
spread reported (these machines are noisy: see ENVIRONMENT.md):
  plain      VAE + text encoder + Next-DiT forward/backward + torch AdamW, fp32 weights under bf16
             autocast: the loop one would write without DeepSpeed
  deepspeed  train.trainer.train_step on the same model, batch and codecs: ZeRO-2, bf16 weights with an
             fp32 master, gradient clipping, the non-finite guard, then the sharded EMA's update
             (goal: plain/deepspeed time >= 0.9)
  loader     train.data.make_loader alone on a packed synthetic stage at the same resolution and micro
             batch, 1 worker (goal: loader samples/s >= 3x the deepspeed leg's samples/s)
Model: a 27M-parameter Next-DiT (dim 384, 6 layers: where compute, not overhead, dominates on CPU)
with the tiny offline codecs; fixed shapes, so every step does the same work. On a GPU, `2b-width`: NextDiT_2B's
width (dim 2304, 24 heads, 8 KV heads) with 8 layers (both legs' weights, gradients and AdamW states fit one
GPU together), bf16; MFU = useful FLOPs (train.flops) / step time / the GPU's measured bf16 matmul rate.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import _data  # noqa: E402
from bench._results import save, spread  # noqa: E402

# the caption embedder's width (cap_feat_dim) is the loaded text encoder's, set in bench()
BENCH_MODEL = dict(dim=384, n_layers=6, n_refiner_layers=2, n_heads=6, n_kv_heads=2, axes_dims=(16, 24, 24))
BENCH_MODEL |= dict(multiple_of=64, in_channels=16)
CONFIG = "train/configs/stage1_cpu.yaml"  # the trainer's CPU config; the bench overrides its data and codecs


def packed_stage(workdir: Path, images: int, resolution: int) -> Path:
    """The synthetic data set (datagen.synth) packed at RESOLUTION by the pack job (Ray, shut down after)."""
    data, out = workdir / f"synth_{images}", workdir / f"packed_{images}_{resolution}"
    return _data.packed_synth_stage(data, out, images, seed=21, shard_size=128, resolution=resolution)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=6, help="timed steps per leg per round")
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--micro", type=int, default=8)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--workdir", default="/tmp/unicap-bench-trainer")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--model", default="bench", choices=["bench", "2b-width"])
    p.add_argument("--packed", default=None, help="a packed stage at --resolution (default: made here, with Ray)")
    p.add_argument("--out", default=None, help="results JSON (default bench/results/trainer[_cuda].json)")
    p.add_argument(
        "--set", action="append", default=[], help="trainer config overrides (e.g. deepspeed.overlap_comm=false)"
    )
    p.add_argument("--no-guard", action="store_true", help="remove the non-finite gradient hooks (to price them)")
    p.add_argument("--loader-batches", type=int, default=60, help="batches the loader leg reads per round")
    args = p.parse_args()
    if "LOCAL_RANK" in os.environ:  # the rank: any failure ends it at once, as the trainers' ranks do
        from unicap import distributed

        return distributed.run_main(lambda: bench(args))
    # re-run under torchrun (DeepSpeed wants a process group), on a free port
    from unicap.runtime import master_port

    os.environ.setdefault("DS_ACCELERATOR", "cuda" if args.device == "cuda" else "cpu")
    rendezvous = ["--master_addr", "127.0.0.1", "--master_port", str(master_port(None, 1, 29731))]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", *rendezvous, __file__]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.call([*cmd, *sys.argv[1:]], env=env)


def bench(args: argparse.Namespace) -> int:
    import deepspeed
    import torch

    from train import flow, trainer
    from train.config import deepspeed_config, load
    from train.data import make_loader
    from train.ema import ShardedEMA
    from train.model import NextDiT, NextDiTConfig
    from unicap import distributed

    dev = args.device
    packed = Path(args.packed) if args.packed else packed_stage(Path(args.workdir), args.images, args.resolution)
    data = ["data.latent_cache_mb=0", f"data.packed={packed}", f"data.resolution={args.resolution}"]
    data += [f"data.micro_batch={args.micro}"]  # the training legs' and the loader leg's
    step = [f"data.global_batch={args.micro}", "loss.lowres_weight=1.0", "model.vae=tiny"]
    cfg = load(CONFIG, [*data, *step, *args.set])
    distributed.init(dev)
    if dev == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    codecs = trainer.load_codecs(cfg, dev)
    if args.model == "bench":
        mcfg = NextDiTConfig(**BENCH_MODEL, cap_feat_dim=codecs.text.dim)
    else:
        from dataclasses import replace

        from train.model import NextDiT_configs

        mcfg = replace(NextDiT_configs["NextDiT_2B"], n_layers=8, cap_feat_dim=codecs.text.dim)

    def fresh_model() -> NextDiT:
        torch.manual_seed(0)
        return NextDiT(mcfg).to(dev)

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    # the batches: read once, the same for both training legs (so they measure training, not reading)
    it = iter(make_loader(cfg.data, seed=0, rank=0, world_size=1))
    batches, tries = [], 0
    while len(batches) < args.steps:
        tries += 1
        if tries > 50 * args.steps:
            raise SystemExit(f"no bucket of {packed} fills --micro {args.micro}: pack more --images")
        b = next(it)
        if len(b["captions"]) == args.micro:  # full batches only: every step the same work
            batches.append(b)

    plain = fresh_model()
    popt = torch.optim.AdamW(plain.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-15, weight_decay=0.0)

    def plain_step(batch):
        xt, t, feats, mask, v = trainer.flow_batch(codecs, batch, cfg, dev)
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=cfg.deepspeed.precision == "bf16"):
            pred = plain(xt, t, feats.float(), mask)
        loss = flow.flow_loss(pred, v, lowres_weight=cfg.loss.lowres_weight)
        popt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), cfg.optim.grad_clip)
        popt.step()

    ds_model = fresh_model()
    dopt = torch.optim.AdamW(ds_model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-15, weight_decay=0.0)
    engine, *_ = deepspeed.initialize(model=ds_model, optimizer=dopt, config=deepspeed_config(cfg, 1))
    guard = trainer.GradGuard(engine.module)
    if args.no_guard:
        for h in guard.handles:
            h.remove()

    ema, steps_done = ShardedEMA(engine.module, cfg.optim.ema_decay), [0]

    def ds_step(batch):  # the trainer's step: ZeRO-2, the guard, the one agreed collective, then the EMA
        steps_done[0] += 1
        if trainer.train_step(engine, codecs, [batch], cfg, dev, guard).finite:
            ema.update(steps_done[0])

    def timed(fn, items) -> float:
        sync()
        t0 = time.perf_counter()
        for x in items:
            fn(x)
        sync()
        return time.perf_counter() - t0

    loader_cfg = load(CONFIG, [*data, "data.num_workers=1"]).data

    def loader_rate(n_batches: int) -> float:
        it = iter(make_loader(loader_cfg, seed=1, rank=0, world_size=1))
        next(it)  # worker start-up is not throughput
        t0, samples = time.perf_counter(), 0
        for _ in range(n_batches):
            samples += len(next(it)["captions"])
        return samples / (time.perf_counter() - t0)

    timed(plain_step, batches[:2])  # warm-up (allocator, oneDNN kernels)
    timed(ds_step, batches[:2])
    rounds = []
    for r in range(args.rounds):
        tp = timed(plain_step, batches)
        td = timed(ds_step, batches)
        lr = loader_rate(args.loader_batches)
        ds_rate = args.steps * args.micro / td
        record = {
            "round": r,
            "plain_s_per_step": round(tp / args.steps, 4),
            "ds_s_per_step": round(td / args.steps, 4),
            "plain_over_ds": round(tp / td, 3),
            "trainer_samples_per_s": round(ds_rate, 2),
            "loader_samples_per_s": round(lr, 1),
            "loader_over_trainer": round(lr / ds_rate, 1),
        }
        rounds.append(record)
        print(rounds[-1], flush=True)

    def summary(key):
        return spread([r[key] for r in rounds], 4)

    n_params = sum(p.numel() for p in plain.parameters())
    extra = {}
    if dev == "cuda":  # MFU of both legs: useful FLOPs of the step's batch / time / measured bf16 matmul rate
        from bench.bench_nextdit import matmul_rate
        from train.flops import train_step_flops

        b = batches[0]
        _, _, _, mask, _ = trainer.flow_batch(codecs, b, cfg, dev)
        side = args.resolution // 8 // mcfg.patch_size
        flops = train_step_flops(mcfg, mask.sum(1).tolist(), [side * side] * args.micro)
        peak = matmul_rate("cuda", 8192)
        for leg in ("plain", "ds"):
            extra[f"{leg}_mfu"] = spread([flops / r[f"{leg}_s_per_step"] / peak for r in rounds], 4)
        extra |= {"matmul_tflops": round(peak / 1e12, 1), "device_name": torch.cuda.get_device_name(0)}
        extra["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
        extra["goals_gpu"] = {"plain_over_deepspeed_time": ">= 0.9", "ds_mfu": ">= 0.45 at 256 px, batch 32"}
    shape = {"resolution": args.resolution, "micro_batch": args.micro, "steps": args.steps}
    results = {"model_params": n_params, "device": dev, "model": args.model, **extra, **shape}
    results |= {"threads": torch.get_num_threads(), "rounds": rounds}
    results["plain_over_deepspeed_time"] = summary("plain_over_ds")
    results["loader_over_trainer"] = summary("loader_over_trainer")
    results["goals"] = {"plain_over_deepspeed_time": ">= 0.9", "loader_over_trainer": ">= 3"}
    default_out = Path(__file__).parent / "results" / ("trainer.json" if dev == "cpu" else "trainer_cuda.json")
    save(results, args.out or str(default_out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
