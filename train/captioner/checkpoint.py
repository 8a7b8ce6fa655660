"""The captioner's checkpoints: the one place that saves and loads them (safetensors + JSON, no pickle).

checkpoints/step-N/ holds model.safetensors (fp32 master weights, module names), optimizer.safetensors (AdamW
moments) and state.json; rank 0 writes it under a hidden name and renames it when complete. save_checkpoint and
load_checkpoint are collective: full tensors are gathered from and scattered to ZeRO's shards (train.zero).
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import torch

from train import zero
from train.captioner.store import CaptionerRunStore
from unicap import distributed
from unicap.storage import Location

CHECKPOINTS_DIR = "checkpoints"
MODEL_FILE, OPTIMIZER_FILE, STATE_FILE = "model.safetensors", "optimizer.safetensors", "state.json"
STATE_VERSION = 1


class TrainingError(RuntimeError):
    """The run cannot go on; the message says why and what to do."""


def complete_checkpoints(run_dir: Path) -> list[Path]:
    root = run_dir / CHECKPOINTS_DIR
    return sorted(p for p in root.glob("step-*") if (p / STATE_FILE).is_file()) if root.is_dir() else []


def read_state(folder: Path | Location) -> dict:
    """A checkpoint's state.json, local or in a bucket (where the file's presence is the commit)."""
    path = folder.join(STATE_FILE) if isinstance(folder, Location) else Path(folder) / STATE_FILE
    if not path.is_file():
        raise TrainingError(f"{folder} is not a complete captioner checkpoint: no {STATE_FILE}")
    state = json.loads(path.read_bytes())
    missing = [k for k in ("version", "step", "samples_consumed", "train_seconds", "base", "config") if k not in state]
    if missing or state["version"] != STATE_VERSION:
        raise TrainingError(
            f"{path}: not a captioner checkpoint state (missing {missing}, version {state.get('version')})"
        )
    return state


def save_checkpoint(
    engine, run_dir: Path, state: dict, keep_last: int, publish: CaptionerRunStore | None = None
) -> Path:
    """checkpoints/step-N (collective: full tensors gathered from ZeRO's shards); rank 0 writes, then with
    `publish` uploads it to the run's URI, state.json last, and prunes the bucket to keep_last."""
    from safetensors.torch import save_file

    params = zero.trainable(engine.module)
    model = {n: zero.full_master(p) for n, p in params}
    moments = {f"{k}.{n}": zero.full_optimizer_state(p, k) for n, p in params for k in zero.OPTIMIZER_KEYS}
    folder = run_dir / CHECKPOINTS_DIR / f"step-{state['step']:08d}"
    if distributed.rank() == 0:
        tmp = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in model.items()}, str(tmp / MODEL_FILE))
        save_file({k: v.contiguous() for k, v in moments.items()}, str(tmp / OPTIMIZER_FILE))
        (tmp / STATE_FILE).write_text(json.dumps({"version": STATE_VERSION, **state}, indent=1, sort_keys=True))
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
        for old in complete_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in folder.parent.glob(".step-*.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if publish is not None:
            publish.publish_checkpoint(folder, keep_last)
    distributed.barrier()
    return folder


def load_checkpoint(engine, folder: Path) -> dict:
    """Restore master weights and AdamW moments (collective); the module's weights were loaded before
    deepspeed.initialize (`checkpoint_weights`)."""
    from safetensors.torch import load_file

    state = read_state(folder)
    master = load_file(str(folder / MODEL_FILE))
    moments = load_file(str(folder / OPTIMIZER_FILE))
    params = zero.trainable(engine.module)
    missing = [n for n, _ in params if n not in master]
    if missing:
        raise TrainingError(f"{folder} lacks {missing[:3]}...: another model or grounding setting?")
    zero.ensure_optimizer_state(engine)
    for n, p in params:
        zero.set_full_master(p, master[n])
        for k in zero.OPTIMIZER_KEYS:
            zero.set_full_optimizer_state(p, moments[f"{k}.{n}"], k)
    zero.set_optimizer_step_count(engine, state["step"])
    return state


def checkpoint_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / MODEL_FILE))
