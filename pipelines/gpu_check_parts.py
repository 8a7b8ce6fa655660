"""The parts of `make gpu-check` (pipelines.gpu_check runs them; its docstring says what each one checks).

A part is a function of the check's context (ctx: work and data folders, packed stage, timeout, trainer
overrides, training size, ranks) -> its result: {"status": "ok" | "failed" | "skipped", its numbers, "why"}.
Every command runs in its own process group, as users run it. Only the standard library is imported here at
the top: the check starts on a bare GPU machine's Python.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGE1 = "train/configs/stage1_cpu.yaml"
# the random tiny codecs: transformers and diffusers only (a bare GPU machine has no open_clip for tiny-clip)
CODECS = ["model.vae=tiny", "model.text_encoder=tiny"]
BATCH = ["data.micro_batch=4", "data.global_batch=8", "data.num_workers=2"]
RUN = ["run.progress=false", "run.tensorboard=false", "run.sample_steps=4"]
TRAIN = [*CODECS, *BATCH, *RUN]  # every trainer part's overrides (and data.resolution)
TRAINER_STEPS = 20


def has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# ---------------------------------------------------------------- running commands


def env_vars() -> dict:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    if not cuda_available():
        env["DS_ACCELERATOR"] = "cpu"  # --allow-cpu: the same parts, on gloo
    else:
        env.setdefault("DS_ACCELERATOR", "cuda")  # a deepspeed wheel built on a CPU machine records 'cpu'
    return env


def sh(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run a command in its own session; on timeout its whole process group goes (ranks hold GPUs)."""
    pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env_vars(), start_new_session=True, **pipes)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, err = proc.communicate()
        err += f"\ngpu-check: killed after {timeout:g}s"
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def launcher(nproc: int, *args: str) -> list[str]:
    from unicap.runtime import master_port

    rendezvous = ["--master_addr", "127.0.0.1", "--master_port", str(master_port(None, 1, 29500))]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), *rendezvous, *args]


def cli(*args: str) -> list[str]:
    """`python -m unicap.cli ARGS`: a command as a user types it."""
    return [sys.executable, "-m", "unicap.cli", *args]


def trainer_args(ctx: dict, out: Path, *overrides: str) -> list[str]:
    """train.trainer's arguments: stage1 on the check's packed data, written under OUT."""
    return ["--config", STAGE1, f"data.packed={ctx['packed']}", f"run.out={out}", *ctx["train"], *overrides]


def tail(r: subprocess.CompletedProcess, n: int = 1500) -> str:
    """The end of a command's output; for a failed rank, its own traceback (not the launcher's after it)."""
    failed_rank = re.search(r"rank \d+ failed:", r.stderr)
    if failed_rank:
        return r.stderr[failed_rank.start() :][:n].strip()
    return (r.stdout[-n:] + "\n" + r.stderr[-n:]).strip()


def result(ok: bool, r: subprocess.CompletedProcess, **numbers) -> dict:
    """A part's result from its command: ok or failed, its numbers, and for a failure why (its output's end)."""
    return {"status": "ok" if ok else "failed", **numbers, **({} if ok else {"why": tail(r)})}


# ---------------------------------------------------------------- parts


def part_env(ctx: dict) -> dict:
    import torch

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0]}
    if torch.cuda.is_available():
        info |= {"device": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count()}
        info["memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    for m in ("deepspeed", "diffusers", "transformers", "ray", "vllm", "open_clip", "pytest"):
        info[m] = _version(m)
    return {"status": "ok", **info}


def _version(module: str) -> str | None:
    if not has(module):
        return None
    try:
        return getattr(__import__(module), "__version__", "present")
    except Exception as e:  # noqa: BLE001 - a broken install is a finding, not a crash of the check
        return f"broken: {type(e).__name__}: {e}"[:120]


def _metrics(run: Path) -> dict[int, dict]:
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return {m["step"]: m for m in map(json.loads, lines)}


def part_trainer(ctx: dict) -> dict:
    """20 steps with a checkpoint every 6: SIGTERM at step >= 3 (its checkpoint), then the same command resumes
    to the end; the final folder, its diffusers export and the sample grid. One run stopped and resumed, not an
    uninterrupted run beside it: every launch costs its start-up (~25 s on 2 CPU cores). The CPU trainer tests
    compare resumed and uninterrupted losses (gloo); on a GPU this checks that the resume runs to the end."""
    out, nproc = ctx["work"] / "trainer", ctx["nproc"]
    args = ["-m", "train.trainer", *trainer_args(ctx, out, f"run.steps={TRAINER_STEPS}", "run.save_every=6")]
    run = out / "stage1"
    t0 = time.time()
    pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc = subprocess.Popen(launcher(nproc, *args), cwd=ROOT, env=env_vars(), start_new_session=True, **pipes)
    deadline = time.time() + ctx["timeout"]
    while proc.poll() is None and time.time() < deadline and max(_metrics(run), default=0) < 3:
        time.sleep(0.2)
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):  # it may end between the poll and the signal
            os.killpg(proc.pid, signal.SIGTERM)
    try:
        text, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        text = proc.communicate()[0] + "\ngpu-check: killed 120 s after SIGTERM"
    stopped = "stopped by signal" in text
    if proc.returncode != 0 and not stopped:  # it failed by itself (start-up, config): its own output, no relaunch
        return {"status": "failed", "seconds": round(time.time() - t0, 1), "why": text[-3000:]}
    if not stopped:
        text += "\ngpu-check: the run ended before the SIGTERM reached it (no checkpoint by signal to resume from)"
    r = sh(launcher(nproc, *args), ctx["timeout"])
    took = time.time() - t0
    m = _metrics(run)
    final = run / "final"
    resumed = r.returncode == 0 and "resuming" in r.stdout and sorted(m) == list(range(1, TRAINER_STEPS + 1))
    last = m.get(TRAINER_STEPS, {})
    res = {
        "seconds": round(took, 1),
        "steps": len(m),
        "loss_first_last": [m.get(1, {}).get("loss"), last.get("loss")],
        "samples_per_s_last": last.get("samples_per_s"),
        "sigterm_checkpoint": stopped,
        "resumed": resumed,
        "final_weights": (final / "model.safetensors").exists(),
        "diffusers_export": (final / "diffusers" / "config.json").exists(),
        "sample_grid": any((run / "samples").glob("*.png")),
    }
    good = stopped and resumed and res["final_weights"] and res["diffusers_export"] and res["sample_grid"]
    if res["final_weights"]:
        ctx["final"] = final
    return {"status": "ok" if good else "failed", **res, **({} if good else {"why": text[-1500:] + tail(r)})}


def part_zero3(ctx: dict) -> dict:
    out = ctx["work"] / "zero3"
    args = trainer_args(ctx, out, "run.steps=4", "deepspeed.zero_stage=3", "run.sample_prompts=[]")
    r = sh(launcher(ctx["nproc"], "-m", "train.trainer", *args), ctx["timeout"])
    m = _metrics(out / "stage1")
    losses = [m.get(1, {}).get("loss"), m.get(4, {}).get("loss")]
    return result(r.returncode == 0 and len(m) == 4, r, loss_first_last=losses)


# The crash part's script: train.trainer with flow_loss failing on the last rank at its 3rd call; it writes the
# time of the failure to MARK (argv[1]) first. Run by torchrun as a file: the rest of argv is the trainer's.
CRASH = r"""
import os, runpy, sys, time
import train.flow
real, seen, mark = train.flow.flow_loss, [0], sys.argv[1]
def faulty(*a, **k):
    seen[0] += 1
    if int(os.environ["RANK"]) == int(os.environ["WORLD_SIZE"]) - 1 and seen[0] == 3:
        open(mark, "w").write(repr(time.time()))
        raise RuntimeError("gpu-check: injected failure at step 3")
    return real(*a, **k)
train.flow.flow_loss = faulty
sys.argv = ["train.trainer", *sys.argv[2:]]
runpy.run_module("train.trainer", run_name="__main__", alter_sys=True)
"""


def part_crash(ctx: dict) -> dict:
    """The last rank raises at step 3 (data-loader workers running): the launcher must return non-zero within
    seconds (torchrun's own SIGKILL comes after 30 s) with no rank left."""
    script, mark = ctx["work"] / "crash.py", ctx["work"] / "crash.failed_at"
    script.write_text(CRASH)
    args = trainer_args(ctx, ctx["work"] / "crash", "run.steps=50", "run.sample_prompts=[]")
    r = sh(launcher(ctx["nproc"], str(script), str(mark), *args), ctx["timeout"])
    if not mark.exists():
        return {"status": "failed", "why": "the injected failure never ran: " + tail(r)}
    took = time.time() - float(mark.read_text())
    ok = r.returncode != 0 and took < 10
    peers = "" if ctx["nproc"] > 1 else " (one rank: no peer was left waiting in a collective)"
    note = f"the last rank raised at its 3rd micro-batch{peers}"
    numbers = {"exit_code": r.returncode, "seconds_to_exit": round(took, 1), "ranks": ctx["nproc"], "note": note}
    return {"status": "ok" if ok else "failed", **numbers}


def part_sample(ctx: dict) -> dict:
    if "final" not in ctx:
        return {"status": "skipped", "why": "no trained weights (the trainer part did not run or failed)"}
    out = ctx["work"] / "samples"
    t0 = time.time()
    prompts = ["--prompt", "a red circle", "--prompt", "两个蓝色的正方形"]
    drawing = ["--out", str(out), "--size", f"{ctx['size']}x{ctx['size']}", "--steps", "8"]
    r = sh(cli("sample", "--ckpt", str(ctx["final"]), *prompts, *drawing), ctx["timeout"])
    n = len(list(out.glob("*.png")))
    speed = sampling_speed(ctx)
    ok = r.returncode == 0 and n == 2 and "why" not in speed
    return result(ok, r, images=n, speedup=speed.get("speedup"), seconds=round(time.time() - t0, 1), speed=speed)


def sampling_speed(ctx: dict) -> dict:
    """The speed row: bench/bench_sampling.py --speed-only, the reference (Euler, 50 steps, no cache) against the
    default sampler on a random NextDiT_2B-width model at 1024 px on CUDA; on CPU (--allow-cpu) a tiny model for a
    few steps, so that the command the GPU runs is the one tested."""
    out = ctx["work"] / "sampling_speed.json"
    if cuda_available():
        sizing = ["--device", "cuda", "--model", "NextDiT_2B", "--size", "1024", "--batch", "1", "--rounds", "3"]
    else:
        sizing = ["--device", "cpu", "--model", "NextDiT_XS", "--size", "64", "--batch", "2", "--rounds", "1"]
        sizing += ["--ref-steps", "8", "--default-steps", "4"]
    r = sh([sys.executable, "bench/bench_sampling.py", "--speed-only", *sizing, "--out", str(out)], ctx["timeout"])
    if r.returncode != 0 or not out.exists():
        return {"why": tail(r)}
    res = json.loads(out.read_text())
    evals = res["evaluations_per_image"]
    return {"speedup": res["default"]["speedup"], "args": res["default"]["args"], "evaluations_per_image": evals}


def part_adherence(ctx: dict) -> dict:
    if "final" not in ctx:
        return {"status": "skipped", "why": "no trained weights (the trainer part did not run or failed)"}
    out = ctx["work"] / "adherence"
    judged = ["--truth", str(ctx["data"] / "shards"), "--out", str(out), "--n", "8", "--steps", "4"]
    r = sh(cli("adherence", "--weights", f"stage1={ctx['final']}", *judged), ctx["timeout"])
    return result(r.returncode == 0 and (out / "adherence.json").exists(), r)


def part_captioner(ctx: dict) -> dict:
    out = ctx["work"] / "captioner"
    config = ["--config", "train/configs/captioner_tiny.yaml", "--nproc", str(ctx["nproc"])]
    schedule = ["run.steps=4", "run.save_every=2", "optim.ground_first_steps=2", "optim.warmup_steps=1"]
    plain = ["run.max_minutes=0", "run.progress=false", "run.log_every=1", "data.num_workers=0"]
    r = sh(cli("train-captioner", *config, f"run.out={out}", *schedule, *plain), ctx["timeout"])
    return result(r.returncode == 0 and (out / "final" / "unicap_captioner.json").exists(), r)


def part_score(ctx: dict) -> dict:
    missing = [m for m in ("ray", "open_clip") if not has(m)]
    if missing:
        return {"status": "skipped", "why": f"not installed: {', '.join(missing)}"}
    out, shards = ctx["work"] / "scores", ctx["data"] / "shards"
    args = ["--input", str(shards), "--captions", str(shards / "truth"), "--output", str(out), "--clip", "tiny"]
    r = sh(cli("score", *args), ctx["timeout"])
    return result(r.returncode == 0 and any(out.glob("*.parquet")), r)


def part_gpu_tests(ctx: dict) -> dict:
    if not has("pytest"):
        return {"status": "skipped", "why": "pytest not installed"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests/train/test_gpu.py"]
    r = sh(cmd, ctx["timeout"])
    last = (r.stdout.strip().splitlines() or [""])[-1]
    return {"status": "ok" if r.returncode in (0, 5) else "failed", "summary": last}


def part_mfu(ctx: dict) -> dict:
    if not cuda_available():
        return {"status": "skipped", "why": "needs CUDA"}
    out = ctx["work"] / "mfu.json"
    r = sh([sys.executable, "bench/bench_nextdit.py", "--gpu", "--out", str(out)], ctx["timeout"])
    ok = r.returncode == 0
    return result(ok, r, table=r.stdout[-2500:] if ok else None)


def part_step(ctx: dict) -> dict:
    """The trainer's whole step (loader batch, VAE + text encoding, ZeRO-2, the non-finite guard, EMA-free) against
    a plain PyTorch loop: on CUDA a NextDiT_2B-width model, batch 32, with the MFU of each leg; on CPU
    (--allow-cpu) the bench's small model for two steps, so that the command the GPU runs is the one tested."""
    out = ctx["work"] / "trainer_step.json"
    if cuda_available():
        sizing = ["--device", "cuda", "--model", "2b-width", "--micro", "32", "--steps", "5", "--rounds", "3"]
    else:
        sizing = ["--device", "cpu", "--model", "bench", "--micro", "4", "--steps", "2", "--rounds", "1"]
        sizing += ["--loader-batches", "4"]
    # the tiny codecs of the other parts: the CPU configs' tiny CLIP would need open_clip (gpu_bundle.py says why)
    codecs = ["--set", "model.text_encoder=tiny"]
    inputs = ["--resolution", str(ctx["size"]), "--packed", str(ctx["packed"]), "--out", str(out)]
    r = sh([sys.executable, "bench/bench_trainer.py", *sizing, *codecs, *inputs], ctx["timeout"])
    if r.returncode != 0 or not out.exists():
        return {"status": "failed", "why": tail(r)}
    res = json.loads(out.read_text())
    keys = ("plain_over_deepspeed_time", "plain_mfu", "ds_mfu", "peak_memory_gib", "matmul_tflops")
    return {"status": "ok", **{k: res[k] for k in keys if k in res}}


# the parts by their command-line names, in the order a full check runs them
PARTS = {
    "env": part_env,
    "trainer": part_trainer,
    "zero3": part_zero3,
    "crash": part_crash,
    "sample": part_sample,
    "adherence": part_adherence,
    "captioner": part_captioner,
    "score": part_score,
    "gpu-tests": part_gpu_tests,
    "mfu": part_mfu,
    "step": part_step,
}
