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
(bench/bench_nextdit.py --gpu), step (bench/bench_trainer.py: the trainer's step against a plain loop). The parts
are in pipelines.gpu_check_parts.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

from pipelines.gpu_check_parts import PARTS, TRAIN, cuda_available, has

TRAINING = ("deepspeed", "diffusers", "transformers", "pyarrow", "PIL", "yaml")
NEEDS = {  # what each part imports, beyond torch: a part whose packages are missing is skipped, saying which
    **dict.fromkeys(("trainer", "zero3", "crash", "step"), TRAINING),
    "captioner": ("deepspeed", "transformers", "pyarrow", "PIL", "yaml"),
    "sample": ("diffusers", "transformers", "PIL", "yaml"),
    "adherence": ("diffusers", "transformers", "pyarrow", "PIL", "yaml"),
}
DATA_PARTS = ("trainer", "zero3", "crash", "adherence", "score", "step")


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
        if picks:
            install = ["install", "-q", "--no-index", "--no-deps", "--target", str(site), *picks]
            r = subprocess.run([sys.executable, "-m", "pip", *install], capture_output=True, text=True)
            if r.returncode != 0:
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
    shards, stage1 = data / "shards", data / "stages" / "stage1.parquet"
    synth(str(shards), 256, seed=7, shard_size=64)  # a 256 px bucket fills micro-batches of 32
    index = read_index(shards)
    locations = [str(shards / f"{s}.tar") for s in index["shard"]]
    size = {"width": index.width, "height": index.height}
    manifest = pd.DataFrame({"key": index.key, "shard": index["shard"], "location": locations, **size})
    stage1.parent.mkdir(parents=True, exist_ok=True)
    manifest.to_parquet(stage1)
    try:
        pack_stage(stage1, shards / "truth", data / "packed", shards_dir=shards, resolution=resolution)
    finally:
        import ray

        ray.shutdown()
    return data


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu_check.json")
    p.add_argument("--work", default=".cache/gpu_check/work", help="scratch folder (emptied first)")
    p.add_argument("--data", default=".cache/gpu_check/data", help="prepared data (see --prepare)")
    p.add_argument("--prepare", action="store_true", help="only make --data (needs Ray) and exit")
    wheels_help = "make gpu-bundle's wheels, used when deepspeed or diffusers is missing"
    p.add_argument("--wheels", default=".cache/gpu_wheels", help=wheels_help)
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
    if not cuda_available() and not args.allow_cpu:
        print("error: torch sees no CUDA device (run it on a GPU machine, or --allow-cpu)", file=sys.stderr)
        return 2
    import torch

    work = Path(args.work).resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    nproc = max(1, min(2, torch.cuda.device_count())) if cuda_available() else 2
    ctx = {"work": work, "data": data, "packed": data / "packed", "timeout": args.timeout}
    ctx |= {"train": [*TRAIN, f"data.resolution={args.resolution}"], "size": args.resolution, "nproc": nproc}
    results: dict[str, dict] = {}
    for name in args.parts.split(","):
        t0 = time.time()
        res = run_part(name, ctx)
        res["wall_s"] = round(time.time() - t0, 1)
        results[name] = res
        detail = res.get("why") or ", ".join(f"{k}={v}" for k, v in res.items() if k not in ("status", "table"))
        print(f"{name:10s} {res['status']:8s} {res['wall_s']:7.1f}s  {str(detail).splitlines()[0][:150]}", flush=True)
        if res.get("table"):
            print(res["table"])
    Path(args.out).write_text(json.dumps(results, indent=1, ensure_ascii=False, default=str))
    failed = [n for n, r in results.items() if r["status"] == "failed"]
    print(f"gpu-check: {len(results) - len(failed)} of {len(results)} parts ok or skipped; JSON {args.out}")
    return 1 if failed else 0


def run_part(name: str, ctx: dict) -> dict:
    """One part's result; skipped, saying why, when its packages or the packed data (and Ray to make it) are
    missing; failed when it raises, so that the other parts still run."""
    missing = [m for m in NEEDS.get(name, ()) if not has(m)]
    if missing:
        return {"status": "skipped", "why": f"not installed: {', '.join(missing)}"}
    data = ctx["data"]
    unpacked = name in DATA_PARTS and not (ctx["packed"] / "_pack.json").exists()
    if unpacked and not _try_prepare(data, ctx["size"]):
        return {"status": "skipped", "why": f"no packed data in {data} and no Ray to make it (--prepare elsewhere)"}
    try:
        return PARTS[name](ctx)
    except Exception as e:  # noqa: BLE001 - one part failing must not hide the others
        return {"status": "failed", "why": f"{type(e).__name__}: {e}"}


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
