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
- a rank that stops answering (SIGSTOP, a hung node, a loader fetch that never returns) ends the job too: every
  collective waits at most the process groups' timeout (`set_timeout`: long at start-up and around checkpoints,
  short once the first step is done, as torchtitan's comm.init_timeout_seconds / train_timeout_seconds), and
  each rank posts a heartbeat (its last step, every second) on the launcher's store, so the rank that gives up
  can say which peer stopped: "rank 1 last reached step 12; no heartbeat for 6 s: it stopped answering".
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence

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


def init(device: str, timeout_s: float = 300.0) -> tuple[int, int]:
    """Join the launcher's process group (torchrun or the deepspeed launcher set RANK, WORLD_SIZE, ...):
    NCCL with each rank on GPU LOCAL_RANK, or gloo with the cores shared among this node's ranks. Collectives
    wait `timeout_s` for a peer (the start-up timeout: the trainer shortens it after its first step), and this
    rank's heartbeat starts."""
    import deepspeed

    timeout = datetime.timedelta(seconds=timeout_s)
    if device.startswith("cuda"):
        # as torchtitan: a timed-out NCCL collective aborts its communicator and ends the process (3: skip the
        # clean-up that can itself hang), instead of leaving the rank stuck; the heartbeat names the peer first
        os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "3"
        torch.cuda.set_device(local_rank())  # before the group exists, so NCCL binds this rank's GPU
        deepspeed.init_distributed(dist_backend="nccl", timeout=timeout)
    else:
        deepspeed.init_distributed(dist_backend="gloo", timeout=timeout)
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size()))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    global _timeout_s, _heartbeat
    _timeout_s = timeout_s
    if world_size() > 1 and _heartbeat is None:
        _heartbeat = Heartbeat(dist.distributed_c10d._get_default_store(), rank(), world_size())
    return rank(), world_size()


# ---------------------------------------------------------------- timeouts and heartbeats

BEAT_S = 1.0  # seconds between a rank's heartbeats on the store
_timeout_s = 1800.0  # what the process groups wait now (set by init and set_timeout)
_heartbeat: Heartbeat | None = None


def timeout_s() -> float:
    return _timeout_s


def set_timeout(seconds: float) -> None:
    """From now on every collective of every process group of this rank (the world's and those DeepSpeed made)
    waits at most `seconds` for its peers, then raises (gloo) or aborts the process (NCCL).

    torch.distributed's `_set_pg_timeout` (what torchtitan's set_pg_timeouts calls) changes a live group's
    timeout under both gloo and NCCL, for the collectives issued after it; a second group made with the short
    timeout would need every caller, DeepSpeed's included, to pick the right group. Shortening first waits at a
    barrier under the old timeout (as torchtitan does): else a fast rank's short wait could expire while a slow
    rank finishes work the longer timeout allowed (writing a checkpoint). Lengthening needs no barrier. Groups made
    later (DeepSpeed's, at deepspeed.initialize) start with torch's default until the next call: every call sets
    every group, the same value included."""
    global _timeout_s
    if not initialized():
        _timeout_s = seconds
        return
    if seconds < _timeout_s:
        barrier()
    for group in list(dist.distributed_c10d._world.pg_map):
        dist.distributed_c10d._set_pg_timeout(datetime.timedelta(seconds=seconds), group)
    _timeout_s = seconds
    if _heartbeat is not None:
        _heartbeat.progress()


@contextlib.contextmanager
def patient(seconds: float) -> Iterator[None]:
    """Collectives wait up to `seconds` inside (checkpoint saves and loads gather full tensors and write them),
    then the timeout before it again."""
    before = _timeout_s
    set_timeout(max(seconds, before))
    try:
        yield
    finally:
        set_timeout(before)  # not reached when the block raises past a collective: run_main exits first


def heartbeat(step: int) -> None:
    """This rank reached the boundary before step `step + 1` (its heartbeat then carries it)."""
    if _heartbeat is not None:
        _heartbeat.step = step
        _heartbeat.progress()


class Heartbeat:
    """A daemon thread that writes {step, time, host, pid} to the store every BEAT_S seconds. A frozen rank
    (SIGSTOP, a hung node) stops writing; a rank blocked in a collective or a loader keeps writing. The same
    thread ends this rank when it has made no progress for longer than the timeout while a peer's heartbeat is
    that old too: under NCCL the collective's own timeout may end the process without a word."""

    def __init__(self, store, rank: int, world: int):
        self.store, self.rank, self.world = store, rank, world
        self.step: int | None = None
        self.last_progress = time.monotonic()
        self.me = {"host": socket.gethostname(), "pid": os.getpid()}
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="unicap-heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """End the thread and wait for it: a thread still inside a store call when the process group and the
        interpreter go away aborts the process ("terminate called without an active exception")."""
        self._stopped.set()
        self._thread.join(timeout=10 * BEAT_S)

    @staticmethod
    def key(rank: int) -> str:
        return f"unicap/heartbeat/{rank}"

    def progress(self) -> None:
        self.last_progress = time.monotonic()

    def _run(self) -> None:
        while not self._stopped.is_set():
            try:
                self.store.set(self.key(self.rank), json.dumps({"step": self.step, "t": time.time(), **self.me}))
                if time.monotonic() - self.last_progress > _timeout_s + BEAT_S:
                    peers = self.peers()
                    if any(p["age"] > _timeout_s for p in peers):
                        exit_now(1, f"rank {self.rank}: no progress for {_timeout_s:g}s; {describe(self, peers)}")
            except Exception:  # noqa: BLE001 - the store is gone: the job is ending anyway
                return
            self._stopped.wait(BEAT_S)

    def peers(self) -> list[dict]:
        """The other ranks' last heartbeats: rank, step, age (seconds), host, pid."""
        now, found = time.time(), []
        for r in range(self.world):
            if r == self.rank or not self.store.check([self.key(r)]):
                continue
            beat = json.loads(self.store.get(self.key(r)))
            found.append({**beat, "rank": r, "age": now - beat["t"]})
        return found


def describe(beat: Heartbeat, peers: list[dict], kill_frozen: bool = True) -> str:
    """Which peers stopped answering (no heartbeat for 3 beats) and which are behind; frozen ranks on this host
    are killed (SIGKILL reaches a stopped process; the job is ending and they can no longer be asked)."""
    frozen = [p for p in peers if p["age"] > 3 * BEAT_S]
    behind = [p for p in peers if p not in frozen and (p["step"] or 0) < (beat.step or 0)]
    lines = [f"this rank (rank {beat.rank}) {_reached(beat.step)}"]
    for p in frozen:
        lines.append(f"rank {p['rank']} {_reached(p['step'])}; no heartbeat for {p['age']:.0f}s: it stopped answering")
        if kill_frozen and p["host"] == beat.me["host"]:
            with contextlib.suppress(OSError):
                os.kill(p["pid"], signal.SIGKILL)
    for p in behind:
        lines.append(f"rank {p['rank']} is alive but still at step {p['step']} (stuck in its step or its data loader)")
    if not frozen and not behind:
        lines.append("every peer is alive and at the same step: a slow collective, or raise run.collective_timeout_s")
    return "\n  ".join(lines)


def _reached(step: int | None) -> str:
    return "had not finished its first step" if step is None else f"last reached step {step}"


def is_timeout(exc: BaseException) -> bool:
    """A collective (or a loader worker) that waited past its timeout."""
    return isinstance(exc, getattr(dist, "DistBackendError", ())) or "timed out" in str(exc).lower()


def stuck_report() -> str:
    """Why a collective timed out, as the heartbeats tell it ("" when there are none to read)."""
    if _heartbeat is None:
        return ""
    try:
        peers = _heartbeat.peers()
    except Exception as e:  # noqa: BLE001 - the store may be gone with its host
        return f"(no heartbeats to read: {e})"
    return describe(_heartbeat, peers)


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
    global _heartbeat
    if _heartbeat is not None:  # before the process group: the thread writes to its store
        _heartbeat.stop()
        _heartbeat = None
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
    except BaseException as e:  # noqa: BLE001 - every failure ends the rank, with its traceback
        message = f"rank {rank()} failed:\n{traceback.format_exc()}"
        if is_timeout(e):
            why = f"waited {_timeout_s:g}s (run.collective_timeout_s / run.init_timeout_s)"
            message += f"rank {rank()}: a collective or data-loader wait timed out ({why}):\n  {stuck_report()}"
        exit_now(1, message)
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
