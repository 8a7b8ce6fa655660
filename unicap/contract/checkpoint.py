"""The trainer's checkpoint folder: what is in it, and the metadata every reader may rely on.

A run folder (train.config.TrainConfig.run_dir, e.g. runs/stage1):

    config.yaml                        the resolved TrainConfig of the run
    checkpoints/step-00000500/         one per save; written under a hidden temporary name, then renamed
        model.safetensors              fp32 master weights, consolidated, our (release) parameter names
        ema.safetensors                EMA of the master weights, same names
        optimizer.safetensors          AdamW moments "exp_avg.<name>" / "exp_avg_sq.<name>", consolidated
        state.json                     STATE_KEYS below
    final/                             the stage's output, what the next stage starts from
        model.safetensors              EMA weights (what samples and the export use by default)
        model_raw.safetensors          the master weights themselves
        optimizer.safetensors          kept so a next stage may continue the optimizer (optim.load_optimizer)
        state.json
        diffusers/                     a folder Lumina2Transformer2DModel.from_pretrained loads
    samples/step-00000500.png          sample grids from fixed prompts
    tb/                                TensorBoard scalars

Everything is consolidated (full tensors per parameter name), so a checkpoint resumes on any number of
ranks and under ZeRO-2 or ZeRO-3 alike. Nothing is unpickled to read it: tensors are safetensors, the
rest is JSON.

The run folder may also be a URI (run.out = s3://bucket/runs; train.run_store publishes it). There no
folder is renamed into place, so state.json is the commit object: it is uploaded last, and a checkpoint or
final/ folder in a bucket counts only once its state.json exists (a kill mid-upload leaves the previous one
the latest). The readers below apply that rule to a local path and a URI alike.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from unicap.storage import Location

CHECKPOINT_VERSION = 1
CHECKPOINTS_DIR = "checkpoints"
FINAL_DIR = "final"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
RAW_FILE = "model_raw.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
DIFFUSERS_DIR = "diffusers"

# state.json: every key is required; values are JSON.
STATE_KEYS: dict[str, type | tuple[type, ...]] = {
    "version": int,
    "stage": str,
    "step": int,  # optimizer steps taken
    "batches_consumed": int,  # global micro-batches consumed: the data position (world-size independent)
    "samples_seen": int,
    "skipped_samples": int,  # undecodable / uncaptioned samples skipped so far
    "skipped_steps": int,  # steps skipped for a non-finite loss or gradient
    "world_size": int,  # at save time (informative: resuming on another world size is supported)
    "zero_stage": int,
    "model_config": dict,  # train.model.NextDiTConfig fields
    "text_encoder": str,
    "vae": str,
    "config": dict,  # the resolved TrainConfig
}
# written by the trainer, optional when reading (folders from train.convert / save_weights lack it)
OPTIONAL_STATE_KEYS: dict[str, type | tuple[type, ...]] = {
    "initialised_from": (str, type(None)),  # the final/ folder the stage started from (null: random init)
}


class CheckpointError(ValueError):
    """A checkpoint folder is missing, incomplete, or not one of ours; the message says which."""


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def validate_state(state: dict, where: str = "state.json") -> dict:
    problems = [f"missing {k}" for k in STATE_KEYS if k not in state]
    problems += [
        f"{k} is {type(state[k]).__name__}, expected {t}"
        for k, t in STATE_KEYS.items()
        if k in state and not isinstance(state[k], t)
    ]
    if not problems and state["version"] != CHECKPOINT_VERSION:
        problems.append(f"version {state['version']} != {CHECKPOINT_VERSION}")
    if problems:
        raise CheckpointError(f"{where}: " + "; ".join(problems))
    return state


def _remote(folder) -> Location | None:
    """The Location of a URI (or a remote Location); None for a local path, which keeps its pathlib code."""
    if isinstance(folder, Path) or "://" not in str(folder):
        return None
    from unicap import storage

    loc = storage.resolve(folder)
    return None if loc.is_local else loc


def read_state(folder: str | Path | Location) -> dict:
    remote = _remote(folder)
    path = remote.join(STATE_FILE) if remote else Path(folder) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder} is not a complete checkpoint: no {STATE_FILE}")
    text = path.read_bytes().decode() if remote else path.read_text()
    try:
        return validate_state(json.loads(text), str(path))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not JSON ({e})") from None


def complete_checkpoints(run_dir: str | Path | Location) -> list[Path] | list[Location]:
    """The run's complete checkpoint folders, oldest first (hidden temporaries are ignored; in a bucket,
    a step folder without its state.json, an upload that did not finish, is not one)."""
    remote = _remote(run_dir)
    if remote is not None:
        root = remote.join(CHECKPOINTS_DIR)
        committed = [f.path[len(root.path) :].strip("/").split("/") for f in root.files(STATE_FILE, recursive=True)]
        return [root.join(p[0]) for p in committed if len(p) == 2 and p[0].startswith("step-") and p[1] == STATE_FILE]
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if p.is_dir() and (p / STATE_FILE).is_file())


def latest_checkpoint(run_dir: str | Path | Location) -> Path | Location | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None
