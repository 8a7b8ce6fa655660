"""The device audit's TorchFunctionMode (see sitecustomize.py beside it)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

ROOT = Path(__file__).resolve().parents[2]
TORCH_DIR = str(Path(torch.__file__).parent)
SKIP = (str(ROOT / ".venv"), str(ROOT / ".cache"))  # installed packages and cached builds are not ours


class DevicelessFactories(TorchFunctionMode):
    def __init__(self, out: Path | None = None):
        super().__init__()
        self.out = out
        self.found: list[str] = []
        self.factories = _device_constructors()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.factories and kwargs.get("device") is None:
            where = caller()
            if where is not None:
                line = f"{where} {getattr(func, '__name__', func)}"
                self.found.append(line)
                if self.out is not None:
                    with open(self.out, "a") as f:
                        f.write(line + "\n")
        return func(*args, **kwargs)


MODE_FILES = (
    __file__,
    os.path.join(TORCH_DIR, "overrides.py"),
    os.path.join(TORCH_DIR, "utils", "_device.py"),
)


def caller() -> str | None:
    """file:line of the code that called the factory, when it is one of the project's files. Parameters made
    in an nn.Module's __init__ are left alone: a module is built on the default device and moved as a whole."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename in MODE_FILES:
        frame = frame.f_back
    if frame is None:
        return None
    path = os.path.abspath(frame.f_code.co_filename)
    if not path.startswith(str(ROOT)) or path.startswith(SKIP):
        return None
    if frame.f_code.co_name == "__init__" and isinstance(frame.f_locals.get("self"), torch.nn.Module):
        return None
    return f"{os.path.relpath(path, ROOT)}:{frame.f_lineno}"


def install(folder: str) -> DevicelessFactories:
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{os.getpid()}.started").write_text(" ".join(sys.argv))
    mode = DevicelessFactories(out / f"{os.getpid()}.txt")
    mode.__enter__()  # for the life of the process
    return mode
