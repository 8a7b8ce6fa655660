"""The one place that talks to torch.distributed: joining the process group, the device every collective's
tensors live on, the values ranks agree on, and how a rank that fails leaves.

    rank, world = distributed.init("cuda")          # NCCL on GPUs (one per LOCAL_RANK), gloo on CPUs
    loss_sum, n, stop = distributed.agree([loss_sum, n], flags=[stop_asked])  # ONE collective
    distributed.run_main(main)                      # under `if __name__ == "__main__":`

Rules (DESIGN.md, Devices), each guarded by a CPU test because CI has no GPU:
- a collective sees tensors on the process group's device: CUDA under NCCL, which has no CPU backend
  (`No backend type associated with device type cpu`), the CPU under gloo. `collective_device()` decides.
- values that ranks agree on (losses, counters, stop flags) go through `agree`: one all-reduce for a whole
  list of them, one host sync to read them back. tests/unicap/test_distributed.py fails when any other
  module of the project calls a torch.distributed collective.
- a rank that fails prints its traceback and exits at once (`run_main`): no destructor, thread or `finally`
  that waits on a peer keeps it alive, and its launcher sees a non-zero code within seconds.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

Number = float | int | bool | torch.Tensor


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if initialized() else 1


def local_rank() -> int:
    """This rank's index on its node: torchrun / the deepspeed launcher set LOCAL_RANK; mpirun and srun set
    their own (DeepSpeed's MPI discovery fills LOCAL_RANK only later, inside init_distributed)."""
    for var in ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID"):
        if os.environ.get(var):
            return int(os.environ[var])
    return 0


def init(device: str) -> tuple[int, int]:
    """Join the launcher's process group (torchrun or the deepspeed launcher set RANK, WORLD_SIZE, ...):
    NCCL with each rank on GPU LOCAL_RANK, or gloo with the cores shared among this node's ranks."""
    import deepspeed

    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank())  # before the group exists, so NCCL binds this rank's GPU
        deepspeed.init_distributed(dist_backend="nccl")
    else:
        deepspeed.init_distributed(dist_backend="gloo")
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size()))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return rank(), world_size()


def collective_device() -> torch.device:
    """Where a collective's tensors must live: this rank's GPU under NCCL, else the CPU."""
    if initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree(sums: Sequence[Number] = (), flags: Sequence[Number] = ()) -> tuple[list[float], list[bool]]:
    """Every rank's `sums` added up and `flags` or-ed, in one all-reduce (flags travel as counts: a flag is
    set when any rank set it). Values may be Python numbers or 0-d tensors on any device: tensors are not
    read back before the collective, so a step costs one host sync here, not one per value."""
    values = [*sums, *flags]
    device = collective_device()
    host = [float(v) for v in values if not isinstance(v, torch.Tensor)]
    dev = [v.detach().reshape(()).to(device, torch.float64) for v in values if isinstance(v, torch.Tensor)]
    packed = torch.tensor(host, dtype=torch.float64, device=device)
    if dev:
        packed = torch.cat([packed, torch.stack(dev)])
    if initialized():  # also with one rank: the same path, and a real NCCL collective on a one-GPU check
        dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    got = packed.tolist()
    # back in the caller's order: host values first in `packed`, then tensors
    it_host, it_dev = iter(got[: len(host)]), iter(got[len(host) :])
    ordered = [next(it_dev) if isinstance(v, torch.Tensor) else next(it_host) for v in values]
    return ordered[: len(sums)], [v > 0 for v in ordered[len(sums) :]]


def any_rank(flag: Number) -> bool:
    """True on every rank when any rank's flag is set (one collective)."""
    return agree(flags=[flag])[1][0]


def barrier() -> None:
    if initialized():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def shutdown() -> None:
    """Leave the process group after a successful run (an NCCL group left to the interpreter's exit warns,
    and can wait on work that will never finish)."""
    if initialized():
        dist.destroy_process_group()


def run_main(main: Callable[[], int]) -> int:
    """Run a rank's main. Success: leave the process group and return the exit code. Failure (an exception,
    or a non-zero code while in a process group): print it, flush, and end the process at once with
    os._exit, so that no NCCL teardown, data-loader worker, writer thread or peer can keep a dead rank
    alive; its launcher (torchrun, deepspeed) sees the code and stops the other ranks."""
    try:
        code = main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if code != 0 and initialized():
            exit_now(code, None if isinstance(e.code, int) else str(e.code))
        if code == 0:
            shutdown()
        raise
    except KeyboardInterrupt:
        exit_now(130, f"rank {rank()}: interrupted")
    except BaseException:  # noqa: BLE001 - every failure ends the rank, with its traceback
        exit_now(1, f"rank {rank()} failed:\n{traceback.format_exc()}")
    if code != 0 and initialized():
        exit_now(code)
    shutdown()
    return code


def exit_now(code: int, message: str | None = None) -> None:
    """End this process now: print `message`, kill its forked children, flush, os._exit(code)."""
    import multiprocessing

    if message:
        print(message, file=sys.stderr, flush=True)
    # forked children (data-loader workers) hold this rank's sockets and pipes open until they notice their
    # parent is gone (seconds): the peers' collectives would wait on them
    for child in multiprocessing.active_children():
        try:
            child.kill()
        except Exception:  # noqa: BLE001, S110 - already gone
            pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001, S110 - a closed stream must not stop the exit
            pass
    os._exit(code)
