#!/usr/bin/env bash
# What a bare GPU machine lacks for `python -m pipelines.gpu_check` (../shared/ENVIRONMENT.md: Python 3.12, torch + CUDA,
# transformers, no package registry): deepspeed and diffusers with their pure-Python or cp312 dependencies, as
# wheels in .cache/gpu_wheels, and the check's small packed stage in .cache/gpu_check/data. Made here (registry and
# Ray at hand), carried to the GPU machine, where gpu_check installs the wheels into .cache/gpu_site by itself.
#   make gpu-bundle         (then carry .cache/gpu_wheels and .cache/gpu_check/data)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=.cache/gpu_wheels
PYVER=${GPU_PYTHON:-3.12}
mkdir -p "$OUT"
ver() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
# deepspeed is published as a source archive only: its wheel is pure Python, built here
"$PY" -m pip wheel -q --no-deps "deepspeed==$(ver deepspeed)" -w "$OUT"
# the rest as binaries for the GPU machine's Python (pure-Python wheels fit any)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d "$OUT" \
    "diffusers==$(ver diffusers)" "pydantic==$(ver pydantic)" "pydantic-core==$(ver pydantic-core)" \
    hjson msgpack py-cpuinfo einops ninja psutil annotated-types "typing-extensions>=4.16" "typing-inspection>=0.4.4" \
    importlib-metadata zipp
"$PY" -m pipelines.gpu_check --prepare --data .cache/gpu_check/data
du -sh "$OUT" .cache/gpu_check/data
