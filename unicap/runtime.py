"""Where work runs: the one place that decides devices, dtypes, threads per actor and how Ray starts.

Every job, the trainer, the demo and the tests ask here instead of probing torch or Ray themselves:

    device = runtime.resolve_device("auto")        # "cuda" when a GPU is visible, else "cpu"
    dtype = runtime.resolve_dtype("bf16", device)  # torch.bfloat16
    precision = runtime.resolve_precision("auto", device)  # "bf16" on CUDA and bf16-native CPUs, else "fp32"
    runtime.init_ray(address)                      # embedded local Ray, or the cluster at address
"""

from __future__ import annotations

import os

DEVICES = ("auto", "cpu", "cuda")
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
PRECISIONS = ("auto", "bf16", "fp32")  # a trainer's deepspeed.precision


def has_cuda() -> bool:
    """True when torch sees a CUDA device (False where torch is a CPU build)."""
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - a broken CUDA install means "no GPU" here
        return False


def resolve_device(device: str = "auto") -> str:
    """ "auto" -> "cuda" when present, else "cpu"; "cuda" without a GPU is a clear error."""
    if device not in DEVICES and not device.startswith("cuda:"):
        raise ValueError(f"device {device!r}: use one of {DEVICES} (or cuda:N)")
    if device == "auto":
        return "cuda" if has_cuda() else "cpu"
    if device.startswith("cuda") and not has_cuda():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device on this machine")
    return device


def resolve_dtype(name: str, device: str = "cpu"):
    """ "fp32" | "bf16" | "fp16" -> torch dtype; fp16 on CPU is refused (no fast kernels there)."""
    import torch

    if name not in DTYPES:
        raise ValueError(f"dtype {name!r}: use one of {sorted(DTYPES)}")
    if name == "fp16" and not device.startswith("cuda"):
        raise ValueError("fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    return getattr(torch, DTYPES[name])


def cpu_bf16_native() -> bool:
    """True when this CPU does bf16 matmuls in hardware (AVX512-BF16 or AMX). Elsewhere torch emulates them:
    on a 2-core AVX2 EPYC, 0.84 GFLOPS in bf16 against 25.8 in fp32 (a 512^2 matmul, one thread), so a bf16
    CPU run is ~30x slower than the same run in fp32."""
    import torch

    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without the probes: assume emulation, the safe (fast) answer is fp32
        return False


def resolve_precision(name: str, device: str | None = None) -> str:
    """A trainer's precision on `device` (default: resolve_device("auto")): "auto" -> "bf16" on CUDA and on
    bf16-native CPUs, else "fp32"; "bf16" and "fp32" as asked (bf16 on an emulating CPU is honoured, only slow)."""
    if name not in PRECISIONS:
        raise ValueError(f"precision {name!r}: one of {PRECISIONS}")
    if name != "auto":
        return name
    device = device or resolve_device("auto")
    return "bf16" if device.startswith("cuda") or cpu_bf16_native() else "fp32"


def autocast_enabled(device: str, wanted: bool = True) -> bool:
    """bf16 autocast where it is fast: CUDA, and CPUs with bf16 in hardware (see cpu_bf16_native)."""
    return wanted and (device != "cpu" or cpu_bf16_native())


def cpu_threads_per_actor(concurrency: int) -> int:
    """This machine's cores shared among `concurrency` CPU actors: the compute threads each may use."""
    return max(1, (os.cpu_count() or 1) // max(1, concurrency))


def threads_env(threads: int | None) -> dict[str, str]:
    """Environment that gives a worker process `threads` OpenMP/MKL threads (nothing for None)."""
    return {} if threads is None else {v: str(threads) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}


def init_ray(address: str | None = None, *, quiet: bool = False) -> None:
    """Connect to the cluster at `address` / $RAY_ADDRESS, else start an embedded local instance.

    The local instance declares more logical CPUs than cores, so that fractional actor pools and
    Ray Data's read tasks both fit on small machines (see ENVIRONMENT.md: pools claiming every CPU
    deadlock against the reads)."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=not quiet)
    else:  # "local": a new instance even when another runs on this machine (ray.init() would join that one)
        ray.init(
            address="local",
            num_cpus=max(4, 2 * (os.cpu_count() or 1)),
            include_dashboard=False,
            configure_logging=False,
            log_to_driver=not quiet,
        )


def cluster_gpus(address: str | None = None) -> float:
    """GPUs of the Ray cluster at `address` (the embedded local instance when none): where engines go is the
    cluster's question, not the driver's (a CPU head node submits to GPU workers)."""
    import ray

    init_ray(address)
    return float(ray.cluster_resources().get("GPU", 0))


def cluster_device(device: str, address: str | None = None) -> str:
    """The device of a Ray job's actors: "auto" -> "cuda" when the cluster has GPUs, else "cpu"; "cuda" on a
    cluster without GPUs is a clear error. Asked of the cluster, not of the driver's machine."""
    if device not in DEVICES:
        raise ValueError(f"device {device!r}: use one of {DEVICES} (Ray places each actor on its own GPU)")
    if device == "cpu":
        return "cpu"
    gpus = cluster_gpus(address)
    if device == "cuda" and gpus <= 0:
        raise ValueError("device 'cuda' asked for, but the Ray cluster has no GPUs")
    return "cuda" if gpus > 0 else "cpu"


def engine_gpus(cluster: float, per_engine: int, engines: int) -> int:
    """GPUs each engine actor claims: `per_engine` (tensor parallel) on a GPU cluster, 0 on CPUs. A job asking
    for more GPUs than the cluster has is refused here, with the numbers, instead of waiting on Ray forever."""
    if cluster <= 0:
        return 0
    if per_engine * engines > cluster:
        raise ValueError(
            f"{engines} engine(s) x {per_engine} GPU(s) each need {per_engine * engines} GPUs; the "
            f"cluster has {cluster:g}: lower --concurrency or --tensor-parallel"
        )
    return per_engine


def master_port(port: int | None, nodes: int, default: int) -> int:
    """The rendezvous port of a launch: as given; else `default` across nodes (every node must agree on it), and
    a free port on one node, so that two runs on one machine (a demo and a `make stage1`) never collide."""
    if port is not None:
        return port
    if nodes > 1:
        return default
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
