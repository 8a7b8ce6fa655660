"""The DeepSpeed trainer: Next-DiT on one stage's packed subset (`make stage1|stage2|stage3`).

    deepspeed --num_gpus 8 --module train.trainer --config train/configs/stage1_2b.yaml [key=value ...]
    torchrun --nproc_per_node 2 -m train.trainer --config train/configs/stage1_cpu.yaml run.steps=20

Per optimizer step (train.step): grad_accum micro-batches per rank, each one aspect-ratio bucket of images
with one caption each (train.data); VAE latents and Gemma-2 features computed online (frozen codecs);
rectified flow with a resolution-dependent time shift and the 4x-pooled auxiliary loss (train.flow);
ZeRO-2/3 with a torch AdamW, gradient clipping, bf16; a sharded EMA (train.ema). All randomness (noise,
times) is a pure function of (seed, global batch index, sample), and the data position is one global count
of batches consumed, so a resumed run, also on another number of ranks, continues exactly.

Each stage starts from the previous stage's final weights (run.init_from: auto). Checkpoints every
run.save_every steps, on SIGTERM/SIGINT (save, then exit 0) and at the end (`final/`, with a diffusers
export); a re-run resumes from the latest checkpoint, and a finished stage is not trained twice.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from train import checkpoint as ckpt
from train import run_store
from train.config import STAGES, TrainConfig, deepspeed_config
from train.config import load as load_config
from train.ema import ShardedEMA
from train.latent_cache import LatentCache
from train.model import NextDiT, NextDiT_configs
from train.step import Codecs, GradGuard, StepResult, train_step
from train.step import flow_batch as flow_batch  # re-exported: bench/bench_trainer.py and tests call it here
from train.stop import StopFlag
from unicap import config as uconfig
from unicap import distributed, runtime
from unicap.contract import checkpoint as contract


class TrainingError(RuntimeError):
    """The run cannot go on (missing previous stage, too many non-finite steps, ...); the message says why."""


# ---------------------------------------------------------------- setup


def previous_stage_final(cfg: TrainConfig) -> run_store.Folder | None:
    """Where this stage's initial weights come from: None (random init) or a final/ folder (local or a URI)."""
    src = cfg.run.init_from
    if src in (None, "none"):
        return None
    if src == "auto":
        i = STAGES.index(cfg.run.stage)
        if i == 0:
            return None
        folder = run_store.stage_final(cfg.run.out, STAGES[i - 1])
        if not run_store.has_state(folder):
            raise TrainingError(
                f"{cfg.run.stage} starts from {STAGES[i - 1]}'s final weights, but {folder} "
                f"holds none: run `make {STAGES[i - 1]}` first (or set run.init_from)"
            )
        return folder
    folder = run_store.folder(src)
    if not run_store.has_state(folder):
        raise TrainingError(f"run.init_from {src}: not a checkpoint or final folder (no {contract.STATE_FILE})")
    return folder


def resume_folder(cfg: TrainConfig, store: run_store.RunStore | None = None) -> run_store.Folder | None:
    """The checkpoint to resume from: the run folder's latest complete one (in the bucket, for a URI run.out)."""
    if cfg.run.resume == "never":
        return None
    if cfg.run.resume == "auto":
        return contract.latest_checkpoint((store or run_store.RunStore(cfg.run.out, cfg.run.stage)).run_dir)
    folder = run_store.folder(cfg.run.resume)
    contract.read_state(folder)
    return folder


def load_codecs(cfg: TrainConfig, device: str) -> Codecs:
    from train.codecs import VAE, text_encoder

    dtype = runtime.resolve_dtype("bf16" if device.startswith("cuda") else "fp32", device)
    text = text_encoder(cfg.model.text_encoder, max_length=cfg.model.text_max_length, dtype=dtype).to(device)
    vae = VAE(cfg.model.vae, dtype=dtype).to(device)
    return Codecs(text=text, vae=vae, latents=LatentCache(cfg.data.latent_cache_mb << 20))


def build_model(cfg: TrainConfig, text_dim: int) -> NextDiT:
    if cfg.model.name not in NextDiT_configs:
        raise ValueError(f"model.name {cfg.model.name!r}: one of {sorted(NextDiT_configs)}")
    # the caption embedder reads the text encoder's features: its width is the encoder's (2304 for Gemma-2-2B)
    mcfg = dataclasses.replace(NextDiT_configs[cfg.model.name], cap_feat_dim=text_dim)
    arch = {"rope_theta": cfg.model.rope_theta, "frame_pos": cfg.model.frame_pos}  # set ones replace the name's
    mcfg = dataclasses.replace(mcfg, **{k: v for k, v in arch.items() if v is not None})
    torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank
    model = NextDiT(mcfg)
    model.set_attention_backend(cfg.model.attention)
    model.set_activation_checkpointing(cfg.model.activation_checkpointing)
    if cfg.model.compile:
        model.compile_blocks()
    return model


def lr_lambda(cfg: TrainConfig, start_step: int):
    """Linear warmup then constant, as a function of the global step (so nothing to save or restore)."""
    warm = cfg.optim.warmup_steps

    def fn(i: int) -> float:
        step = start_step + i
        return min(1.0, (step + 1) / warm) if warm > 0 else 1.0

    return fn


# ---------------------------------------------------------------- samples


def sample_grid(cfg: TrainConfig, ema_state: dict, model_cfg, codecs: Codecs, path: Path):
    """A grid of samples from the fixed prompts with the EMA weights (rank 0); returns the PIL image. Its sampling
    settings and transformer evaluations go into the PNG (train.sample.SAMPLING_KEY)."""
    from PIL import Image

    from train.sample import SAMPLING_KEY, generate, save_png

    codec = next(codecs.vae.parameters())
    model = NextDiT(model_cfg)
    model.load_state_dict(ema_state)
    model = model.to(codec.device, codec.dtype).eval()  # where the codecs are, in their dtype (bf16 on GPUs)
    side = cfg.data.resolution
    coefficients = grid_cache_coefficients(cfg, path.parent.parent)
    threshold = cfg.run.sample_cache_threshold if coefficients is not None else 0.0
    sampling = dict(steps=cfg.run.sample_steps, solver=cfg.run.sample_solver, cfg_scale=cfg.run.sample_cfg)
    sampling |= dict(cache_threshold=threshold, cache_coefficients=coefficients, seed=cfg.run.seed)
    images = generate(model, codecs.text, codecs.vae, list(cfg.run.sample_prompts), width=side, height=side, **sampling)
    grid = Image.new("RGB", (side * len(images), side), "white")
    for i, im in enumerate(images):
        grid.paste(im, (i * side, 0))
    grid.info[SAMPLING_KEY] = images[0].info[SAMPLING_KEY]  # one batch: the same settings and counts for all
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(grid, path)
    return grid


def grid_cache_coefficients(cfg: TrainConfig, run_dir: Path) -> list[float] | None:
    """The step cache's coefficients for the grids: the stage's own final/ (calibrated earlier) or else its init
    weights' (a close relative), when local and calibrated; None: the grid runs without the cache."""
    from train.step_cache import load_coefficients

    if cfg.run.sample_cache_threshold <= 0:
        return None
    init = previous_stage_final(cfg)
    for folder in (run_dir / contract.FINAL_DIR, init):
        if folder is not None and not run_store.is_uri(folder) and (c := load_coefficients(Path(folder))):
            return c
    return None


# ---------------------------------------------------------------- the run


def train(cfg: TrainConfig) -> int:
    import deepspeed

    from train.data import make_loader
    from train.packed_stage import check_packed

    device = runtime.resolve_device("auto")
    # auto -> bf16 on CUDA and bf16-native CPUs, else fp32 (emulated bf16 is ~30x slower): config.yaml says which
    cfg.deepspeed.precision = runtime.resolve_precision(cfg.deepspeed.precision, device)
    store = run_store.RunStore(cfg.run.out, cfg.run.stage)  # run.out a URI: a local working copy, published
    run_dir = store.local
    # refusals first: before any rank starts a process group or loads a model
    if store.remote is not None and os.environ.get("RANK", "0") == "0":
        store.check_writable()  # a missing bucket, no credentials, no permission: one line, before training
    done = store.final_state()
    if not (done and done["step"] >= cfg.run.steps):
        resume = resume_folder(cfg, store)
        init = None if resume else previous_stage_final(cfg)
        check_packed(cfg.data.packed)  # a folder or a URI holding a packed stage, else one line
    rank, world = distributed.init(device, timeout_s=cfg.run.init_timeout_s)  # collective_timeout_s after step 1
    if done and done["step"] >= cfg.run.steps:
        if rank == 0:
            final = store.run_dir_join(contract.FINAL_DIR)
            print(f"[{cfg.run.stage}] already trained: {final} (delete it to train again)")
        return 0
    origin = {name: run_store.describe(f) if f else None for name, f in (("resume", resume), ("init", init))}
    resume, init = store.fetch(resume, init)  # local folders (collective: a URI's are downloaded per node)

    codecs = load_codecs(cfg, device)
    model = build_model(cfg, codecs.text.dim)
    source = resume or init
    if source is not None:
        model.load_state_dict(ckpt.module_weights(source))
    accum = cfg.grad_accum(world)
    start = contract.read_state(resume) if resume else None
    start_step = start["step"] if start else 0
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=cfg.optim.lr,
        betas=cfg.optim.betas,
        eps=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, start_step))
    ds_config = deepspeed_config(cfg, world, device)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds_config)
    distributed.set_timeout(cfg.run.init_timeout_s)  # DeepSpeed's own groups start at torch's default
    ema = ShardedEMA(engine.module, cfg.optim.ema_decay)
    if resume:
        ckpt.load_training_state(engine, ema, resume, optimizer=True)
    elif init is not None:
        ckpt.load_training_state(engine, ema, init, optimizer=cfg.optim.load_optimizer, ema_file=contract.MODEL_FILE)
    guard = GradGuard(engine.module)
    counters = {
        k: (start[k] if start else 0) for k in ("batches_consumed", "samples_seen", "skipped_samples", "skipped_steps")
    }
    base = ckpt.base_state(cfg, engine.module, world)
    # the weights this stage started from (kept across resumes): the stage chain is auditable from state.json
    base["initialised_from"] = start.get("initialised_from") if start else origin["init"]
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        uconfig.save(cfg, run_dir / "config.yaml")
        store.publish_logs()  # a URI run folder: config.yaml there from the start
        how = f"resuming {origin['resume']}" if resume else f"from {origin['init']}" if init else "from random init"
        global_batch = f"{cfg.data.micro_batch} x {accum} x {world} = {cfg.global_batch(world)}"
        print(
            f"[{cfg.run.stage}] {cfg.model.name} on {world} rank(s) ({device}), global batch {global_batch}, "
            f"ZeRO-{cfg.deepspeed.zero_stage}, {cfg.deepspeed.precision}; steps {start_step} -> {cfg.run.steps}; {how}",
            flush=True,
        )

    loader = make_loader(cfg.data, seed=cfg.run.seed, rank=rank, world_size=world, start=counters["batches_consumed"])
    loader.timeout = cfg.run.init_timeout_s if loader.num_workers else 0  # a worker's fetch that never returns raises
    batches = iter(loader)
    writer = _tensorboard(cfg, run_dir) if rank == 0 else None
    if writer is not None:
        store.flush_before_publish.append(writer.flush)  # the events published with each checkpoint are whole
    metrics = open(run_dir / "metrics.jsonl", "a") if rank == 0 else None  # noqa: SIM115 - one line per step
    bar = _progress(cfg, start_step) if rank == 0 else None
    with StopFlag(cfg.run.stop_file, grace_s=cfg.run.term_grace_s) as stop:  # signals act as before after it
        key_log = None
        if cfg.run.log_keys:  # every sample key this rank trained on, one line per micro-batch (audits coverage)
            (run_dir / "keys").mkdir(parents=True, exist_ok=True)
            key_log = open(run_dir / "keys" / f"rank{rank}-of{world}-from{start_step}.txt", "a")  # noqa: SIM115
        bad_in_row, step, t_last, last_saved = 0, start_step, time.time(), start_step

        def state() -> dict:
            return {**base, "step": step, **counters}

        while step < cfg.run.steps:
            micro = [next(batches) for _ in range(accum)]
            res = train_step(engine, codecs, micro, cfg, device, guard, key_log, stop_asked=stop.asked)
            stop.answer(res.stop)  # every rank reached this boundary: progress for the SIGTERM watchdog
            if key_log is not None:
                key_log.flush()
            step += 1
            distributed.heartbeat(step)  # the step a peer names if this rank stops answering
            if step == start_step + 1:  # start-up is over: a peer that stops answering ends the job within seconds
                distributed.set_timeout(cfg.run.collective_timeout_s)
            counters["batches_consumed"] += accum * world
            counters["samples_seen"] += res.samples
            counters["skipped_samples"] += res.skipped_samples
            if res.finite:
                ema.update(step)
                bad_in_row = 0
            else:
                counters["skipped_steps"] += 1
                bad_in_row += 1
                if rank == 0:
                    print(
                        f"[{cfg.run.stage}] step {step}: non-finite loss or gradient; step skipped, weights unchanged",
                        flush=True,
                    )
                if bad_in_row >= cfg.run.max_nonfinite:
                    with distributed.patient(cfg.run.init_timeout_s):
                        ckpt.save_checkpoint(engine, ema, run_dir, state(), cfg.run.keep_last, publish=store)
                    raise TrainingError(
                        f"{bad_in_row} non-finite steps in a row (run.max_nonfinite): stopping; the "
                        "last good weights are in the checkpoint. Lower optim.lr or check the data."
                    )
            now = time.time()
            if rank == 0:
                rate = res.samples / max(now - t_last, 1e-9)
                _log(writer, bar, step, res, rate, engine.get_lr()[0], counters, metrics)
            t_last = now
            if cfg.run.sample_every and step % cfg.run.sample_every == 0 and step < cfg.run.steps:
                with distributed.patient(cfg.run.init_timeout_s):
                    _samples(cfg, ema, engine, codecs, run_dir, step, writer, rank)
            stopping = res.stop
            if step % cfg.run.save_every == 0 or stopping:
                with distributed.patient(cfg.run.init_timeout_s):  # full tensors gathered and written
                    folder = ckpt.save_checkpoint(engine, ema, run_dir, state(), cfg.run.keep_last, publish=store)
                last_saved = step
                if rank == 0 and stopping:
                    print(
                        f"[{cfg.run.stage}] stopped {stop.why()} at step {step}; checkpoint {store.show(folder)}; "
                        "run the same command to resume",
                        flush=True,
                    )
                if stopping:
                    if writer is not None:
                        writer.close()
                    return 0
    if bar is not None:
        bar.close()
    distributed.set_timeout(cfg.run.init_timeout_s)  # the last checkpoint, final/, its export and the samples
    if last_saved != step:
        ckpt.save_checkpoint(engine, ema, run_dir, state(), cfg.run.keep_last, publish=store)

    out = ckpt.save_final(engine, ema, run_dir, state())
    if rank == 0:
        from train.convert import export_diffusers, not_in_diffusers

        if reason := not_in_diffusers(model.cfg):
            print(f"[{cfg.run.stage}] no diffusers export: {reason}", flush=True)
        else:
            export_diffusers(out)
    _samples(cfg, ema, engine, codecs, run_dir, step, writer, rank)
    if rank == 0:
        store.publish_final()  # a URI run folder: the logs, then final/ with its state.json last
        print(
            f"[{cfg.run.stage}] done: {step} steps, {counters['samples_seen']} samples "
            f"({counters['skipped_samples']} skipped), {counters['skipped_steps']} steps skipped; "
            f"weights {store.show(out)}",
            flush=True,
        )
        if writer is not None:
            writer.close()
    return 0


def _samples(cfg, ema, engine, codecs, run_dir: Path, step: int, writer, rank: int) -> None:
    if not cfg.run.sample_prompts:
        return
    state = ema.full_state()  # collective
    if rank == 0:
        path = run_dir / "samples" / f"{contract.step_dir_name(step)}.png"
        grid = sample_grid(cfg, state, engine.module.cfg, codecs, path)
        if writer is not None:
            import numpy as np

            writer.add_image("samples", np.asarray(grid), step, dataformats="HWC")
    distributed.barrier()


def _tensorboard(cfg: TrainConfig, run_dir: Path):
    if not cfg.run.tensorboard:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(run_dir / "tb"))


def _progress(cfg: TrainConfig, start_step: int):
    if not cfg.run.progress:
        return None
    from tqdm import tqdm

    return tqdm(
        total=cfg.run.steps, initial=start_step, desc=cfg.run.stage, unit="step", dynamic_ncols=True, file=sys.stdout
    )


def _log(writer, bar, step: int, res: StepResult, rate: float, lr: float, counters: dict, metrics) -> None:
    loss = res.loss if res.finite else None
    grad_norm = res.grad_norm if math.isfinite(res.grad_norm) else None
    row = {"step": step, "loss": loss, "grad_norm": grad_norm, "lr": lr, "samples_per_s": round(rate, 3)}
    metrics.write(json.dumps({**row, "samples": res.samples, "finite": res.finite, **counters}) + "\n")
    metrics.flush()
    if bar is not None:
        bar.update(1)
        bar.set_postfix(loss=f"{res.loss:.4f}", samples_s=f"{rate:.1f}", refresh=False)
    if writer is not None:
        for name, value in (
            ("train/loss", res.loss),
            ("train/grad_norm", res.grad_norm),
            ("train/lr", lr),
            ("train/samples_per_s", rate),
            ("data/skipped_samples", counters["skipped_samples"]),
            ("train/skipped_steps", counters["skipped_steps"]),
        ):
            if math.isfinite(value):
                writer.add_scalar(name, value, step)
    elif bar is None:
        print(f"step {step} loss {res.loss:.4f} grad_norm {res.grad_norm:.3f} {rate:.1f} samples/s", flush=True)


# ---------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="a YAML file (train/configs/...); key=value arguments override it")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    p.add_argument("overrides", nargs="*", help="key=value, e.g. optim.lr=1e-4 run.steps=50")
    args = p.parse_args(argv)
    return load_config(args.config, args.overrides), args


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, _ = parse_args(argv)
        return train(cfg)
    except (TrainingError, uconfig.ConfigError, contract.CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(distributed.run_main(main))
