"""The one place that saves and loads the trainer's state (layout: unicap.contract.checkpoint).

Saving and loading are collective (every rank calls, in the same order): full tensors are gathered per
parameter from ZeRO's shards (train.zero), rank 0 writes them as safetensors plus a JSON state, into a
hidden temporary folder renamed when complete, so a kill mid-save leaves the previous checkpoint intact.
Loading reads safetensors (no unpickling) and scatters into whatever ZeRO stage / world size runs now.
"""

from __future__ import annotations

import json
import re
import shutil
import uuid
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from train import zero
from train.model import NextDiT, NextDiTConfig
from unicap import distributed
from unicap.contract import checkpoint as contract

STALE_SAVE = re.compile(r"\.step-\d{8}\.tmp-[0-9a-f]{8}")  # what _write_folder names a save in progress
# file -> the gathered state it holds. A checkpoint keeps the master weights as the model; the final folder's model
# is the EMA (what sampling and the next stage load), the master beside it as model_raw.
CHECKPOINT_FILES = {contract.MODEL_FILE: "model", contract.EMA_FILE: "ema", contract.OPTIMIZER_FILE: "optimizer"}
FINAL_FILES = {contract.MODEL_FILE: "ema", contract.RAW_FILE: "model", contract.OPTIMIZER_FILE: "optimizer"}


def _rank() -> int:
    return distributed.rank()


def _barrier() -> None:
    distributed.barrier()


def gather_training_state(engine, ema) -> dict[str, dict[str, torch.Tensor]]:
    """{"model", "ema", "optimizer"} -> {name: full fp32 CPU tensor} (collective)."""
    params = zero.trainable(engine.module)
    model = {n: zero.full_master(p) for n, p in params}
    optimizer = {f"{k}.{n}": zero.full_optimizer_state(p, k) for n, p in params for k in zero.OPTIMIZER_KEYS}
    return {"model": model, "ema": ema.full_state(), "optimizer": optimizer}


def _write_folder(final: Path, files: dict[str, dict[str, torch.Tensor]], state: dict) -> Path:
    """Rank 0: write safetensors files + state.json into a temporary sibling, then rename it to `final`."""
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    for name, tensors in files.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / name))
    (tmp / contract.STATE_FILE).write_text(json.dumps(contract.validate_state(state), indent=1, sort_keys=True))
    if final.exists():  # a re-save of the same step (e.g. SIGTERM right after a periodic save)
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def save_checkpoint(engine, ema, run_dir: str | Path, state: dict, keep_last: int, publish=None) -> Path:
    """Write checkpoints/step-N (collective); keep the newest `keep_last`; returns the folder. `publish`
    (a train.run_store.RunStore): rank 0 then uploads the folder to the run's URI, state.json last."""
    tensors = gather_training_state(engine, ema)
    folder = Path(run_dir) / contract.CHECKPOINTS_DIR / contract.step_dir_name(state["step"])
    if _rank() == 0:
        _write_folder(folder, {file: tensors[part] for file, part in CHECKPOINT_FILES.items()}, state)
        for old in contract.complete_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in folder.parent.glob(".step-*.tmp-*"):  # temporaries of killed saves: exactly our names
            if STALE_SAVE.fullmatch(stale.name) and stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
        if publish is not None:
            publish.publish_checkpoint(folder, keep_last)
    _barrier()
    return folder


def save_final(engine, ema, run_dir: str | Path, state: dict) -> Path:
    """The stage's output (collective): EMA weights as model.safetensors, the master as model_raw,
    the optimizer moments and the state (the trainer adds the diffusers export: train.convert)."""
    tensors = gather_training_state(engine, ema)
    folder = Path(run_dir) / contract.FINAL_DIR
    if _rank() == 0:
        _write_folder(folder, {file: tensors[part] for file, part in FINAL_FILES.items()}, state)
    _barrier()
    return folder


def save_weights(
    folder: str | Path, model: NextDiT, text_encoder: str, vae: str, *, step: int = 0, stage: str = "stage1"
) -> Path:
    """A weights folder (model.safetensors + state.json) for a model trained or converted outside the
    DeepSpeed trainer; `load_weights`, `unicap sample` and the next stage read it like a final/ folder."""
    state = {
        "version": contract.CHECKPOINT_VERSION,
        "stage": stage,
        "step": step,
        "batches_consumed": 0,
        "samples_seen": 0,
        "skipped_samples": 0,
        "skipped_steps": 0,
        "world_size": 1,
        "zero_stage": 0,
        "model_config": asdict(model.cfg),
        "text_encoder": text_encoder,
        "vae": vae,
        "config": {},
    }
    tensors = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    return _write_folder(folder, {contract.MODEL_FILE: tensors}, state)


def model_config(state: dict) -> NextDiTConfig:
    cfg = dict(state["model_config"])
    cfg["axes_dims"], cfg["axes_lens"] = tuple(cfg["axes_dims"]), tuple(cfg["axes_lens"])
    return NextDiTConfig(**cfg)


def load_weights(folder: str | Path, weights: str = contract.MODEL_FILE) -> tuple[NextDiT, dict]:
    """A NextDiT (eval, fp32) from a checkpoint or final folder, and its state.json. `weights`:
    model.safetensors (final: EMA; checkpoint: master), ema.safetensors, model_raw.safetensors."""
    folder = Path(folder)
    state = contract.read_state(folder)
    path = folder / weights
    if not path.is_file():
        raise contract.CheckpointError(f"{folder} has no {weights}")
    model = NextDiT(model_config(state))
    model.load_state_dict(load_file(str(path)))
    return model.eval(), state


def load_training_state(
    engine, ema, folder: str | Path, *, optimizer: bool = True, ema_file: str | None = None
) -> dict:
    """Restore master weights, EMA and (optionally) optimizer moments + step count from `folder` into a
    running engine (collective). The module's low-precision weights must have been loaded from the same
    file before deepspeed.initialize (`module_weights`). Returns the folder's state."""
    folder = Path(folder)
    state = contract.read_state(folder)
    weights = contract.RAW_FILE if (folder / contract.RAW_FILE).exists() else contract.MODEL_FILE
    master = load_file(str(folder / weights))
    params = zero.trainable(engine.module)
    missing = [n for n, _ in params if n not in master]
    if missing:
        raise contract.CheckpointError(f"{folder}/{weights} lacks {missing[:3]}... (another model config?)")
    ema_path = folder / (
        ema_file or (contract.EMA_FILE if (folder / contract.EMA_FILE).exists() else contract.MODEL_FILE)
    )
    ema.load_full_state(load_file(str(ema_path)))
    for n, p in params:
        zero.set_full_master(p, master[n])
    if optimizer:
        moments = load_file(str(folder / contract.OPTIMIZER_FILE))
        zero.ensure_optimizer_state(engine)
        for n, p in params:
            for k in zero.OPTIMIZER_KEYS:
                zero.set_full_optimizer_state(p, moments[f"{k}.{n}"], k)
        zero.set_optimizer_step_count(engine, state["step"])
    return state


def module_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """The master weights of a checkpoint / final folder, to load into the module before initialize."""
    folder = Path(folder)
    contract.read_state(folder)
    name = contract.RAW_FILE if (folder / contract.RAW_FILE).exists() else contract.MODEL_FILE
    return load_file(str(folder / name))


def base_state(cfg, model: NextDiT, world_size: int) -> dict:
    """The fields of state.json that do not change during a run."""
    from unicap import config as uconfig

    return {
        "version": contract.CHECKPOINT_VERSION,
        "stage": cfg.run.stage,
        "world_size": world_size,
        "zero_stage": cfg.deepspeed.zero_stage,
        "model_config": asdict(model.cfg),
        "text_encoder": cfg.model.text_encoder,
        "vae": cfg.model.vae,
        "config": uconfig.to_dict(cfg),
    }
