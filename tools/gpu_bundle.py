"""What a bare GPU machine lacks for `python -m pipelines.gpu_check`, computed from this venv's metadata.

A bare GPU machine (../shared/ENVIRONMENT.md) has Python 3.12, torch with its CUDA libraries, transformers,
safetensors, pyarrow, pandas, pillow, tokenizers, tensorboard and pytest, and no package registry. The check's
trainer parts also need deepspeed and diffusers. The bundle is the dependency closure of those two
(`Requires-Dist`, markers evaluated for the GPU machine's Python), minus the closure of what the bare machine
has, each at the version installed here: wheels in .cache/gpu_wheels (deepspeed's built here: it is published
as a source archive only, and its wheel is pure Python), listed with their sizes in `bundle.json`.

    make gpu-bundle                                   # wheels for Python 3.12 + the check's packed data
    GPU_PYTHON=3.11 python tools/gpu_bundle.py        # the wheels for another Python
    python tools/gpu_bundle.py --list                 # only print the closure
    python tools/gpu_bundle.py --bare-venv DIR        # a venv holding only a bare machine's packages (tests)

The text encoder of the check's parts is the random tiny Gemma-family model (transformers only), not the CPU
configs' tiny CLIP: open_clip needs torchvision, whose build must match the GPU machine's CUDA torch exactly,
which no small bundle can promise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
# What ENVIRONMENT.md's "A bare GPU machine" lists as installed (triton comes with CUDA torch's own closure).
BARE_MACHINE = ("torch", "transformers", "safetensors", "pyarrow", "pandas", "pillow", "tokenizers")
BARE_MACHINE += ("tensorboard", "pytest")
# What the check's parts import beyond the bare machine (pipelines/gpu_check.py: NEEDS).
CHECK_NEEDS = ("deepspeed", "diffusers")
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64")


def marker_env(python: str) -> dict[str, str]:
    """The environment markers of `python` ("3.12") on this platform."""
    full = python if python.count(".") == 2 else f"{python}.0"
    return default_environment() | {
        "python_version": ".".join(full.split(".")[:2]),
        "python_full_version": full,
        "implementation_version": full,
    }


Edge = tuple[str, Requirement]  # (the requiring distribution, its requirement)


def walk(roots: tuple[str, ...], python: str) -> tuple[dict[str, str | None], list[Edge]]:
    """Every distribution `roots` need on `python`, by canonical name (the installed version, or None where this
    venv does not hold it: a requirement of the other Python only), and every requirement edge on the way."""
    env = marker_env(python)
    found: dict[str, str | None] = {}
    edges: list[Edge] = []
    todo: list[tuple[str, frozenset[str]]] = [(name, frozenset()) for name in roots]
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        name, extras = todo.pop()
        key = (canonicalize_name(name), extras)
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            found.setdefault(key[0], None)
            continue
        found[key[0]] = dist.version
        active = ["", *sorted(extras)]
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker and not any(req.marker.evaluate(env | {"extra": e}) for e in active):
                continue
            edges.append((key[0], req))
            todo.append((req.name, frozenset(req.extras)))
    return found, edges


def closure(roots: tuple[str, ...], python: str) -> dict[str, str | None]:
    return walk(roots, python)[0]


def guaranteed(python: str) -> dict[str, list[SpecifierSet]]:
    """What a bare GPU machine surely holds, with the version ranges that say so: its listed packages, torch's
    whole closure (the CUDA stack, never to be shadowed), and what the listed packages require directly. Deeper
    dependencies are not counted on: they differ with the machine's versions (transformers 5.17 there)."""
    bare = {canonicalize_name(n) for n in BARE_MACHINE}
    torch_names, torch_edges = walk(("torch",), python)
    _, bare_edges = walk(BARE_MACHINE, python)
    sure: dict[str, list[SpecifierSet]] = {name: [] for name in bare | set(torch_names)}
    for _, req in torch_edges + [e for e in bare_edges if e[0] in bare]:
        sure.setdefault(canonicalize_name(req.name), []).append(req.specifier)
    return sure


def _lowest(specs: list[SpecifierSet]) -> Version | None:
    """The lowest version these ranges let the machine hold (None: no lower bound)."""
    bounds = [Version(s.version) for spec in specs for s in spec if s.operator in (">=", "==", "~=", ">")]
    return max(bounds, default=None)


def bundle_contents(python: str) -> dict[str, str | None]:
    """The check's needs that a bare GPU machine may lack: the ones it does not surely hold, and the ones the
    check needs newer than it surely holds (typing-extensions >= 4.16 for pydantic). The listed packages and
    torch's binary closure are never carried. The GPU machine's pip then takes only what its environment lacks."""
    sure = guaranteed(python)
    listed = {canonicalize_name(n) for n in BARE_MACHINE}
    cuda_stack = set(closure(("torch",), python))  # binary parts must match torch's build: never shadowed
    need, edges = walk(CHECK_NEEDS, python)
    carry = {name for name in need if name not in sure}
    for _, req in edges:
        name = canonicalize_name(req.name)
        if name in sure and name not in carry and req.specifier:
            low = _lowest(sure[name])
            too_old = low is None or not req.specifier.contains(low, prereleases=True)
            if too_old and name not in listed and (name not in cuda_stack or _is_pure(name)):
                carry.add(name)
    return {name: need[name] for name in sorted(carry)}


def _is_pure(name: str) -> bool:
    """A pure-Python distribution (its wheel fits any Python and machine)."""
    wheel = metadata.distribution(name).read_text("WHEEL") or ""
    return "Root-Is-Purelib: true" in wheel


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def build(out: Path, python: str) -> dict:
    """Download (or, for source-only releases, build) one wheel per bundled distribution into `out`."""
    contents = bundle_contents(python)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    unpinned = [name for name, version in contents.items() if version is None]
    if unpinned:
        print(f"gpu-bundle: not installed here, taking the newest for Python {python}: {', '.join(unpinned)}")
    sdist_only = {"deepspeed"}
    for name in sorted(sdist_only & contents.keys()):
        _pip("wheel", "-q", "--no-deps", f"{name}=={contents[name]}", "-w", str(out))
    binaries = [f"{n}=={v}" if v else n for n, v in contents.items() if n not in sdist_only]
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    binary_only = ["--no-deps", "--only-binary=:all:", "--python-version", python, *platforms]
    _pip("download", "-q", *binary_only, "-d", str(out), *binaries)
    wheels = {p.name: p.stat().st_size for p in sorted(out.glob("*.whl"))}
    got = {canonicalize_name(name.split("-")[0]) for name in wheels}
    missing = sorted(contents.keys() - got)
    if missing:
        raise SystemExit(f"gpu-bundle: no wheel came for {', '.join(missing)}")
    manifest = {"python": python, "distributions": contents, "wheels": wheels, "bytes": sum(wheels.values())}
    (out / "bundle.json").write_text(json.dumps(manifest, indent=1))
    return manifest


# ---------------------------------------------------------------- a bare machine, simulated (tests)


def bare_venv(target: Path) -> Path:
    """A venv holding only pip and the bare machine's distributions, linked file by file from this venv:
    made in seconds, offline, with the same torch build as the project's. Returns its python."""
    subprocess.run([sys.executable, "-m", "venv", "--clear", "--without-pip", str(target)], check=True)
    purelib = sysconfig.get_paths(vars={"base": str(target), "platbase": str(target)})["purelib"]
    site = Path(purelib)
    names = closure((*BARE_MACHINE, "pip"), platform.python_version())
    for name in sorted(names):
        dist = metadata.distribution(name)
        for file in dist.files or []:
            if file.parts[0] == "..":  # scripts, headers: outside site-packages
                continue
            src, dst = Path(dist.locate_file(file)), site / file
            if not src.is_file() or dst.exists():
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            _link(src, dst)
    return target / "bin" / "python"


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system
        os.symlink(src.resolve(), dst)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--python", default=os.environ.get("GPU_PYTHON", "3.12"), help="the GPU machine's Python")
    p.add_argument("--out", default=str(ROOT / ".cache" / "gpu_wheels"))
    p.add_argument("--list", action="store_true", help="print the closure and exit")
    p.add_argument("--bare-venv", metavar="DIR", help="make a venv of a bare GPU machine's packages and exit")
    args = p.parse_args(argv)
    if not re.fullmatch(r"3\.\d+", args.python):
        raise SystemExit(f"gpu-bundle: --python / GPU_PYTHON {args.python!r}: a version like 3.12")
    if args.bare_venv:
        print(bare_venv(Path(args.bare_venv)))
        return 0
    if args.list:
        for name, version in bundle_contents(args.python).items():
            print(f"{name}=={version}" if version else name)
        return 0
    manifest = build(Path(args.out), args.python)
    mb = manifest["bytes"] / 1e6
    print(f"gpu-bundle: {len(manifest['wheels'])} wheels for Python {args.python}, {mb:.1f} MB in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
