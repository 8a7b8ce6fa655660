"""Next-DiT forward+backward: unicap's NextDiT vs diffusers' Lumina2Transformer2DModel, same weights.

Same config, same batch (mixed caption lengths, so both take their masked-attention path), in one
run; each model is measured in its own subprocess so that peak RSS is its own.

    .venv/bin/python bench/bench_nextdit.py [--config NextDiT_S] [--batch 4] [--latent 32] [--iters 5]

Reports seconds per forward+backward (median of --iters after a warm-up, the two models' steps
alternated in one process so that machine noise hits both alike), peak RSS (each model alone in a
fresh process), and the ratios.
On a GPU machine it also times NextDiT_2B at 256 and 1024 px in bf16 and reports MFU against a
bf16 matmul rate measured on the same GPU (--gpu), per attention backend; --cpu-mfu does the same
for --config on this CPU.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._results import run_child, save  # noqa: E402

Cases = list[tuple[int, int]]  # (image side in px, batch) of each measurement


def make_inputs(cfg, batch: int, latent: int, device="cpu", dtype=None):
    import torch

    g = torch.Generator().manual_seed(0)
    L = 96
    x = torch.randn(batch, cfg.in_channels, latent, latent, generator=g)
    t = torch.rand(batch, generator=g)
    cap = torch.randn(batch, L, cfg.cap_feat_dim, generator=g)
    lens = torch.tensor([L, L // 2, L // 4, (3 * L) // 4] * ((batch + 3) // 4))[:batch]
    mask = torch.arange(L)[None] < lens[:, None]
    dt = dtype or torch.float32
    return x.to(device, dt), t.to(device), cap.to(device, dt), mask.to(device)


def child(which: str, config: str, batch: int, latent: int, iters: int) -> dict:
    import torch

    from train.convert import diffusers_model_from
    from train.model import NextDiT_configs, build_model

    torch.manual_seed(0)
    ours = build_model(config)
    model = ours if which == "ours" else diffusers_model_from(ours)
    del ours
    x, t, cap, mask = make_inputs(NextDiT_configs[config], batch, latent)

    def step():
        out = model(x, t, cap, mask) if which == "ours" else model(x, t, cap, mask, return_dict=False)[0]
        out.float().square().mean().backward()

    step()  # warm-up
    times = []
    for _ in range(iters):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {
        "seconds": statistics.median(times),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def interleaved_times(config: str, batch: int, latent: int, iters: int) -> dict:
    """Both models in one process, steps alternated: background noise hits both alike."""
    import torch

    from train.convert import diffusers_model_from
    from train.model import NextDiT_configs, build_model

    torch.manual_seed(0)
    ours = build_model(config)
    ref = diffusers_model_from(ours)
    x, t, cap, mask = make_inputs(NextDiT_configs[config], batch, latent)
    steps = {
        "ours": lambda: ours(x, t, cap, mask).square().mean().backward(),
        "diffusers": lambda: ref(x, t, cap, mask, return_dict=False)[0].square().mean().backward(),
    }
    times = {k: [] for k in steps}
    for i in range(iters + 1):
        for name, fn in steps.items():
            ours.zero_grad(set_to_none=True)
            ref.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            fn()
            if i:  # first round is warm-up
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def matmul_rate(device: str, n: int, iters: int = 20) -> float:
    """bf16 FLOP/s of an n x n x n matmul on this device: the MFU denominator, measured, not a datasheet."""
    import torch

    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ a
    sync(device)
    return 2 * n**3 * iters / (time.perf_counter() - t0)


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def timed_steps(model, inputs, iters: int, device: str) -> float:
    """Seconds per fwd+bwd step, after two warm-up steps (compilation, allocator)."""
    for _ in range(2):
        model(*inputs).float().square().mean().backward()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        model(*inputs).float().square().mean().backward()
    sync(device)
    return (time.perf_counter() - t0) / iters


def mfu(config: str, device: str, cases: Cases, backends: list[str], iters: int, compile_blocks: bool = False) -> dict:
    """bf16 fwd+bwd of `config` at each (pixels, batch) and attention backend, as a fraction of the
    measured bf16 matmul rate. FLOPs: train.flops (useful work only: valid tokens, no recompute, so a
    run that falls back to activation checkpointing on OOM reports the lower, honest MFU)."""
    import torch

    from train.flops import train_step_flops
    from train.model import build_model

    peak = matmul_rate(device, 8192 if device == "cuda" else 2048, 20 if device == "cuda" else 5)
    torch.manual_seed(0)
    model = build_model(config).to(device, torch.bfloat16)
    if compile_blocks:
        model.compile_blocks()
    res = {"config": config, "device": device, "matmul_tflops": peak / 1e12, "compiled": compile_blocks}
    for px, batch in cases:
        latent = px // 8  # FLUX VAE: 8x down
        x, t, cap, mask = make_inputs(model.cfg, batch, latent, device, torch.bfloat16)
        flops = train_step_flops(model.cfg, mask.sum(1).tolist(), [(latent // model.cfg.patch_size) ** 2] * batch)
        for backend in backends:
            model.set_attention_backend(backend)
            model.set_activation_checkpointing(False)
            try:
                try:
                    dt = timed_steps(model, (x, t, cap, mask), iters, device)
                except torch.OutOfMemoryError:  # 2B at 1024 px on an 80 GB card: recompute instead
                    model.zero_grad(set_to_none=True)
                    torch.cuda.empty_cache()
                    model.set_activation_checkpointing(True)
                    dt = timed_steps(model, (x, t, cap, mask), iters, device)
            except RuntimeError as e:  # e.g. flash_varlen without flash-attn installed
                res[f"{px}px_{backend}"] = {"error": str(e).splitlines()[0]}
                continue
            ckpt = bool(model.checkpoint_blocks)
            rates = {"seconds": dt, "tflops": flops / dt / 1e12, "mfu": flops / dt / peak}
            res[f"{px}px_{backend}"] = {"batch": batch, **rates, "activation_checkpointing": ckpt}
            leg = f"{config} {px}px batch {batch} {backend}{' ckpt' if ckpt else ''}"
            print(f"{leg}: {dt * 1e3:.1f} ms, mfu {rates['mfu']:.3f}", flush=True)
        model.zero_grad(set_to_none=True)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="NextDiT_S")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--latent", type=int, default=32)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--child", choices=["ours", "diffusers"])
    ap.add_argument("--gpu", action="store_true", help="also NextDiT_2B at 256 and 1024 px on CUDA, bf16, with MFU")
    ap.add_argument("--cpu-mfu", action="store_true", help="also --config in bf16 at 256 px with MFU on this CPU")
    ap.add_argument("--compile", action="store_true", help="MFU runs also with torch.compile'd blocks (inductor)")
    ap.add_argument("--out", default="bench/results/nextdit.json")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.config, args.batch, args.latent, args.iters)))
        return 0
    res = {"config": args.config, "batch": args.batch, "latent": args.latent}
    for which in ("ours", "diffusers"):  # peak memory: each model alone in a fresh process
        sizes = ["--config", args.config, "--batch", str(args.batch), "--latent", str(args.latent), "--iters", "2"]
        res[which] = {"peak_rss_mb": run_child(__file__, "--child", which, *sizes)["peak_rss_mb"]}
    times = interleaved_times(args.config, args.batch, args.latent, args.iters)
    for which in ("ours", "diffusers"):
        res[which]["seconds_fwd_bwd"] = times[which]
    res["speedup_vs_diffusers"] = times["diffusers"] / times["ours"]
    res["peak_rss_ratio_ours_over_diffusers"] = res["ours"]["peak_rss_mb"] / res["diffusers"]["peak_rss_mb"]
    backends = ["sdpa", "torch_varlen", "flash_varlen"]
    if args.cpu_mfu:
        case = [(8 * args.latent, args.batch)]
        res["cpu_mfu"] = mfu(args.config, "cpu", case, backends[:2], args.iters)
        if args.compile:
            res["cpu_mfu_compiled"] = mfu(args.config, "cpu", case, backends[:1], args.iters, compile_blocks=True)
    if args.gpu:
        gpu_cases = [(256, 32), (1024, 4)]  # (px, batch)
        res["gpu"] = mfu("NextDiT_2B", "cuda", gpu_cases, backends, args.iters)
        if args.compile:
            sdpa_and_flash = backends[:1] + backends[2:]
            res["gpu_compiled"] = mfu("NextDiT_2B", "cuda", gpu_cases, sdpa_and_flash, args.iters, compile_blocks=True)
    save(res, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
