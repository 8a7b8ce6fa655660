"""`make gpu-check`: the GPU path checked and measured on one GPU machine, in one command (issue 19).

    make gpu-check                                   # with the project's venv
    python -m pipelines.gpu_check --out gpu_check.json   # any Python with torch (a bare GPU machine)
    python -m pipelines.gpu_check --prepare .cache/gpu_check/data   # on a CPU machine with the venv: the data

Each part runs in its own processes, as users run it, and reports ok / failed / skipped with one line and
its numbers; the table is printed and everything goes into one JSON. Parts whose packages are missing (Ray,
vLLM, open_clip, deepspeed, diffusers) are skipped with the reason, never silently. The trainer parts need
a packed 256 px stage and a synthetic truth folder: --data DIR when it holds them (--prepare makes them where
Ray is installed, and the folder travels to a machine without Ray), else they are made here when Ray is
importable.

Parts: env, trainer (ZeRO-2 steps, SIGTERM then resume, final weights, diffusers export, sample grid),
zero3, crash (a rank raising mid-run ends the launcher within seconds), sample (`unicap sample`), adherence,
captioner (the captioner trainer), score (needs Ray + open_clip), gpu-tests (pytest -m gpu), mfu
(bench/bench_nextdit.py --gpu), step (bench/bench_trainer.py: the trainer's step against a plain loop).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("env", "trainer", "zero3", "crash", "sample", "adherence", "captioner", "score", "gpu-tests", "mfu",
         "step")  # fmt: skip
# the random tiny codecs: transformers and diffusers only (a bare GPU machine has no open_clip for tiny-clip)
TRAIN = ["model.vae=tiny", "model.text_encoder=tiny", "data.micro_batch=4", "data.global_batch=8",
         "data.num_workers=2", "run.progress=false", "run.tensorboard=false", "run.sample_steps=4"]  # fmt: skip


def has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


class InputError(Exception):
    """An input the check cannot run with: said in one line before any part starts."""


def use_bundle(wheels: Path) -> str | None:
    """On a machine without deepspeed / diffusers: install what this environment lacks of the wheels
    `make gpu-bundle` made (carried in .cache/gpu_wheels) into gpu_site beside them, for this process and the ones it
    starts. pip's resolver picks them against what is installed (`--dry-run --report`), so a package the
    machine already holds at a fitting version is never shadowed. Returns what it did."""
    if has("deepspeed") and has("diffusers"):
        return None
    found = sorted(str(p) for p in wheels.glob("*.whl")) if wheels.is_dir() else []
    if not found:
        raise InputError(
            f"no deepspeed/diffusers here and no bundle in {wheels}: run `make gpu-bundle` on a machine with "
            "the venv and carry .cache/gpu_wheels and .cache/gpu_check/data along"
        )
    _check_wheels_fit(wheels, found)
    site = wheels.parent / "gpu_site"
    stamp = site / ".wheels"
    if not (stamp.exists() and stamp.read_text() == "\n".join(found)):  # none installed yet, or another bundle
        shutil.rmtree(site, ignore_errors=True)
        site.mkdir(parents=True)
        picks = _missing_wheels(wheels, site)
        install = ["install", "-q", "--no-index", "--no-deps", "--target", str(site), *picks]
        r = subprocess.run([sys.executable, "-m", "pip", *install], capture_output=True, text=True) if picks else None
        if r is not None and r.returncode != 0:
            raise InputError(f"installing {wheels}: {r.stderr.strip()[-300:]}")
        stamp.write_text("\n".join(found))
    sys.path.insert(0, str(site))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    importlib.invalidate_caches()
    return f"using {site} (wheels from {wheels})"


def _check_wheels_fit(wheels: Path, found: list[str]) -> None:
    """Every wheel installable on this Python and machine, else one line naming the Python it was made for."""
    from packaging.tags import sys_tags
    from packaging.utils import parse_wheel_filename

    here = set(sys_tags())
    misfits = [Path(w).name for w in found if not parse_wheel_filename(Path(w).name)[3] & here]
    if misfits:
        manifest = wheels / "bundle.json"
        made_for = json.loads(manifest.read_text())["python"] if manifest.exists() else "another Python"
        mine = ".".join(map(str, sys.version_info[:2]))
        raise InputError(
            f"the bundle in {wheels} is for Python {made_for} ({misfits[0]}), this is Python {mine}: "
            f"make gpu-bundle GPU_PYTHON={mine}"
        )


def _missing_wheels(wheels: Path, site: Path) -> list[str]:
    """The bundle's wheels that deepspeed and diffusers need here, as pip's resolver picks them."""
    report = site / "resolve.json"
    args = ["install", "-q", "--dry-run", "--no-index", "--find-links", str(wheels), "--report", str(report)]
    env = {**os.environ, "PIP_BREAK_SYSTEM_PACKAGES": "1"}  # a dry run installs nothing
    cmd = [sys.executable, "-m", "pip", *args, "deepspeed", "diffusers"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise InputError(f"the bundle in {wheels} does not complete this environment: {r.stderr.strip()[-300:]}")
    picked = json.loads(report.read_text())["install"]
    return [unquote(urlparse(item["download_info"]["url"]).path) for item in picked]


def env_vars() -> dict:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    if not _cuda():
        env["DS_ACCELERATOR"] = "cpu"  # --allow-cpu: the same parts, on gloo
    else:
        env.setdefault("DS_ACCELERATOR", "cuda")  # a deepspeed wheel built on a CPU machine records 'cpu'
    return env


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def sh(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run a command in its own session; on timeout its whole process group goes (ranks hold GPUs)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env_vars(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # fmt: skip
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

    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
            "127.0.0.1", "--master_port", str(master_port(None, 1, 29500)), *args]  # fmt: skip


def tail(r: subprocess.CompletedProcess, n: int = 1500) -> str:
    """The end of a command's output; for a failed rank, its own traceback (not the launcher's after it)."""
    failed_rank = re.search(r"rank \d+ failed:", r.stderr)
    if failed_rank:
        return r.stderr[failed_rank.start() :][:n].strip()
    return (r.stdout[-n:] + "\n" + r.stderr[-n:]).strip()


# ---------------------------------------------------------------- data


def prepare(data: Path, resolution: int = 256) -> Path:
    """Synthetic shards + truth captions, a stage1 manifest of all of them, packed (uses Ray)."""
    import pandas as pd

    from datagen.shards import read_index
    from datagen.synth import synth
    from pipelines.pack import pack_stage

    meta = data / "packed" / "_pack.json"
    if meta.exists() and json.loads(meta.read_text())["resolution"] == resolution:
        return data
    shutil.rmtree(data / "packed", ignore_errors=True)  # packed at another resolution: the shards are kept
    synth(str(data / "shards"), 256, seed=7, shard_size=64)  # a 256 px bucket fills micro-batches of 32
    index = read_index(data / "shards")
    manifest = pd.DataFrame({"key": index.key, "shard": index["shard"],
                             "location": [str(data / "shards" / f"{s}.tar") for s in index["shard"]],
                             "width": index.width, "height": index.height})  # fmt: skip
    (data / "stages").mkdir(parents=True, exist_ok=True)
    manifest.to_parquet(data / "stages" / "stage1.parquet")
    try:
        pack_stage(data / "stages" / "stage1.parquet", data / "shards" / "truth", data / "packed",
                   shards_dir=data / "shards", resolution=resolution)  # fmt: skip
    finally:
        import ray

        ray.shutdown()
    return data


# ---------------------------------------------------------------- parts


def part_env(ctx: dict) -> dict:
    import torch

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0]}
    if torch.cuda.is_available():
        info |= {"device": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(),
                 "memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)}  # fmt: skip
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


TRAINER_STEPS = 20


def part_trainer(ctx: dict) -> dict:
    """20 steps with a checkpoint every 6: SIGTERM at step >= 3 (its checkpoint), then the same command resumes
    to the end; the final folder, its diffusers export and the sample grid. One run stopped and resumed, not an
    uninterrupted run beside it: every launch costs its start-up (~25 s on 2 CPU cores). The CPU trainer tests
    compare resumed and uninterrupted losses (gloo); on a GPU this checks that the resume runs to the end."""
    out, nproc = ctx["work"] / "trainer", ctx["nproc"]
    trainer = ["-m", "train.trainer", "--config", "train/configs/stage1_cpu.yaml"]
    overrides = [f"data.packed={ctx['packed']}", f"run.out={out}", *ctx["train"]]
    args = [*trainer, *overrides, f"run.steps={TRAINER_STEPS}", "run.save_every=6"]
    run = out / "stage1"
    t0 = time.time()
    proc = subprocess.Popen(launcher(nproc, *args), cwd=ROOT, env=env_vars(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
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
    r = sh(launcher(ctx["nproc"], "-m", "train.trainer", "--config", "train/configs/stage1_cpu.yaml",
                    f"data.packed={ctx['packed']}", f"run.out={out}", *ctx["train"], "run.steps=4",
                    "deepspeed.zero_stage=3", "run.sample_prompts=[]"), ctx["timeout"])  # fmt: skip
    m = _metrics(out / "stage1")
    ok = r.returncode == 0 and len(m) == 4
    return {"status": "ok" if ok else "failed", "loss_first_last": [m.get(1, {}).get("loss"), m.get(4, {}).get("loss")],
            **({} if ok else {"why": tail(r)})}  # fmt: skip


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
    r = sh(launcher(ctx["nproc"], str(script), str(mark), "--config", "train/configs/stage1_cpu.yaml",
                    f"data.packed={ctx['packed']}", f"run.out={ctx['work'] / 'crash'}", *ctx["train"], "run.steps=50",
                    "run.sample_prompts=[]"), ctx["timeout"])  # fmt: skip
    if not mark.exists():
        return {"status": "failed", "why": "the injected failure never ran: " + tail(r)}
    took = time.time() - float(mark.read_text())
    ok = r.returncode != 0 and took < 10
    peers = "" if ctx["nproc"] > 1 else " (one rank: no peer was left waiting in a collective)"
    return {"status": "ok" if ok else "failed", "exit_code": r.returncode, "seconds_to_exit": round(took, 1),
            "ranks": ctx["nproc"], "note": f"the last rank raised at its 3rd micro-batch{peers}"}  # fmt: skip


def part_sample(ctx: dict) -> dict:
    if "final" not in ctx:
        return {"status": "skipped", "why": "no trained weights (the trainer part did not run or failed)"}
    out = ctx["work"] / "samples"
    t0 = time.time()
    r = sh([sys.executable, "-m", "unicap.cli", "sample", "--ckpt", str(ctx["final"]), "--prompt", "a red circle",
            "--prompt", "两个蓝色的正方形", "--out", str(out), "--size", f"{ctx['size']}x{ctx['size']}", "--steps", "8"], ctx["timeout"])  # fmt: skip
    n = len(list(out.glob("*.png")))
    ok = r.returncode == 0 and n == 2
    return {"status": "ok" if ok else "failed", "images": n, "seconds": round(time.time() - t0, 1),
            **({} if ok else {"why": tail(r)})}  # fmt: skip


def part_adherence(ctx: dict) -> dict:
    if "final" not in ctx:
        return {"status": "skipped", "why": "no trained weights (the trainer part did not run or failed)"}
    out = ctx["work"] / "adherence"
    r = sh([sys.executable, "-m", "unicap.cli", "adherence", "--weights", f"stage1={ctx['final']}", "--truth",
            str(ctx["data"] / "shards"), "--out", str(out), "--n", "8", "--steps", "4"], ctx["timeout"])  # fmt: skip
    ok = r.returncode == 0 and (out / "adherence.json").exists()
    return {"status": "ok" if ok else "failed", **({} if ok else {"why": tail(r)})}


def part_captioner(ctx: dict) -> dict:
    out = ctx["work"] / "captioner"
    r = sh([sys.executable, "-m", "unicap.cli", "train-captioner", "--config", "train/configs/captioner_tiny.yaml",
            "--nproc", str(ctx["nproc"]), f"run.out={out}", "run.steps=4", "run.save_every=2",
            "optim.ground_first_steps=2", "optim.warmup_steps=1", "run.max_minutes=0", "run.progress=false",
            "run.log_every=1", "data.num_workers=0"], ctx["timeout"])  # fmt: skip
    ok = r.returncode == 0 and (out / "final" / "unicap_captioner.json").exists()
    return {"status": "ok" if ok else "failed", **({} if ok else {"why": tail(r)})}


def part_score(ctx: dict) -> dict:
    missing = [m for m in ("ray", "open_clip") if not has(m)]
    if missing:
        return {"status": "skipped", "why": f"not installed: {', '.join(missing)}"}
    out = ctx["work"] / "scores"
    r = sh([sys.executable, "-m", "unicap.cli", "score", "--input", str(ctx["data"] / "shards"), "--captions",
            str(ctx["data"] / "shards" / "truth"), "--output", str(out), "--clip", "tiny"], ctx["timeout"])  # fmt: skip
    ok = r.returncode == 0 and any(out.glob("*.parquet"))
    return {"status": "ok" if ok else "failed", **({} if ok else {"why": tail(r)})}


def part_gpu_tests(ctx: dict) -> dict:
    if not has("pytest"):
        return {"status": "skipped", "why": "pytest not installed"}
    r = sh(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-m",
            "gpu",
            "-p",
            "no:cacheprovider",
            "tests/train/test_gpu.py",
        ],
        ctx["timeout"],
    )
    last = (r.stdout.strip().splitlines() or [""])[-1]
    return {"status": "ok" if r.returncode in (0, 5) else "failed", "summary": last}


def part_mfu(ctx: dict) -> dict:
    if not _cuda():
        return {"status": "skipped", "why": "needs CUDA"}
    out = ctx["work"] / "mfu.json"
    r = sh([sys.executable, "bench/bench_nextdit.py", "--gpu", "--out", str(out)], ctx["timeout"])
    ok = r.returncode == 0
    return {"status": "ok" if ok else "failed", "table": r.stdout[-2500:] if ok else None,
            **({} if ok else {"why": tail(r)})}  # fmt: skip


def part_step(ctx: dict) -> dict:
    """The trainer's whole step (loader batch, VAE + text encoding, ZeRO-2, the non-finite guard, EMA-free) against
    a plain PyTorch loop: on CUDA a NextDiT_2B-width model, batch 32, with the MFU of each leg; on CPU
    (--allow-cpu) the bench's small model for two steps, so that the command the GPU runs is the one tested."""
    out = ctx["work"] / "trainer_step.json"
    if _cuda():
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


TRAINING = ("deepspeed", "diffusers", "transformers", "pyarrow", "PIL", "yaml")
NEEDS = {"trainer": TRAINING, "zero3": TRAINING, "crash": TRAINING, "step": TRAINING,
         "captioner": ("deepspeed", "transformers", "pyarrow", "PIL", "yaml"),
         "sample": ("diffusers", "transformers", "PIL", "yaml"),
         "adherence": ("diffusers", "transformers", "pyarrow", "PIL", "yaml")}  # fmt: skip
DATA_PARTS = ("trainer", "zero3", "crash", "adherence", "score", "step")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu_check.json")
    p.add_argument("--work", default=".cache/gpu_check/work", help="scratch folder (emptied first)")
    p.add_argument("--data", default=".cache/gpu_check/data", help="prepared data (see --prepare)")
    p.add_argument("--prepare", action="store_true", help="only make --data (needs Ray) and exit")
    p.add_argument("--wheels", default=".cache/gpu_wheels", help="make gpu-bundle's wheels, used when deepspeed "
                   "or diffusers is missing")  # fmt: skip
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {','.join(PARTS)}")
    p.add_argument("--allow-cpu", action="store_true", help="run on a machine without CUDA (the check's own test)")
    p.add_argument("--timeout", type=float, default=240, help="seconds per command")
    p.add_argument("--resolution", type=int, default=256, help="training resolution of the trainer parts")
    args = p.parse_args(argv)
    data = Path(args.data).resolve()
    if args.prepare:
        prepare(data, args.resolution)
        print(f"gpu-check data: {data}")
        return 0
    unknown = [n for n in args.parts.split(",") if n not in PARTS]
    if unknown:
        print(f"error: unknown part {unknown[0]!r}: {', '.join(PARTS)}", file=sys.stderr)
        return 2
    try:
        check_data(data, args.resolution)
        bundle = use_bundle(Path(args.wheels).resolve())
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if bundle:
        print(f"gpu-check: {bundle}", flush=True)
    if not _cuda() and not args.allow_cpu:
        print("error: torch sees no CUDA device (run it on a GPU machine, or --allow-cpu)", file=sys.stderr)
        return 2
    import torch

    work = Path(args.work).resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ctx = {"work": work, "data": data, "packed": data / "packed", "timeout": args.timeout,
           "train": [*TRAIN, f"data.resolution={args.resolution}"], "size": args.resolution,
           "nproc": max(1, min(2, torch.cuda.device_count())) if _cuda() else 2}  # fmt: skip
    results: dict[str, dict] = {}
    for name in args.parts.split(","):
        t0 = time.time()
        missing = [m for m in NEEDS.get(name, ()) if not has(m)]
        if missing:
            res = {"status": "skipped", "why": f"not installed: {', '.join(missing)}"}
        elif (
            name in DATA_PARTS
            and not (ctx["packed"] / "_pack.json").exists()
            and not _try_prepare(data, args.resolution)
        ):
            res = {
                "status": "skipped",
                "why": f"no packed data in {data} and no Ray to make it (--prepare elsewhere)",
            }
        else:
            try:
                res = globals()[f"part_{name.replace('-', '_')}"](ctx)
            except Exception as e:  # noqa: BLE001 - one part failing must not hide the others
                res = {"status": "failed", "why": f"{type(e).__name__}: {e}"}
        res["wall_s"] = round(time.time() - t0, 1)
        results[name] = res
        detail = res.get("why") or ", ".join(f"{k}={v}" for k, v in res.items() if k not in ("status", "table"))
        print(
            f"{name:10s} {res['status']:8s} {res['wall_s']:7.1f}s  {str(detail).splitlines()[0][:150]}",
            flush=True,
        )
        if res.get("table"):
            print(res["table"])
    Path(args.out).write_text(json.dumps(results, indent=1, ensure_ascii=False, default=str))
    failed = [n for n, r in results.items() if r["status"] == "failed"]
    print(f"gpu-check: {len(results) - len(failed)} of {len(results)} parts ok or skipped; JSON {args.out}")
    return 1 if failed else 0


def check_data(data: Path, resolution: int) -> None:
    """Prepared data packed at another resolution would fail every trainer part: say so once, up front."""
    meta = data / "packed" / "_pack.json"
    if meta.exists():
        packed_at = json.loads(meta.read_text())["resolution"]
        if packed_at != resolution:
            raise InputError(
                f"the data in {data} is packed at {packed_at} px, --resolution is {resolution}: pass "
                f"--resolution {packed_at}, or --prepare --data {data} --resolution {resolution} (needs Ray)"
            )


def _try_prepare(data: Path, resolution: int) -> bool:
    if not (has("ray") and has("pandas")):
        return False
    prepare(data, resolution)
    return True


if __name__ == "__main__":
    sys.exit(main())
