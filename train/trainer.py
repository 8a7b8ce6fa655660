"""The DeepSpeed trainer: Next-DiT on one stage's packed subset (`make stage1|stage2|stage3`).

    deepspeed --num_gpus 8 --module train.trainer --config train/configs/stage1_2b.yaml [key=value ...]
    torchrun --nproc_per_node 2 -m train.trainer --config train/configs/stage1_cpu.yaml run.steps=20

Per optimizer step: grad_accum micro-batches per rank, each one aspect-ratio bucket of images with one
caption each (train.data); VAE latents and Gemma-2 features computed online (frozen codecs); rectified
flow with a resolution-dependent time shift and the 4x-pooled auxiliary loss (train.flow); ZeRO-2/3
with a torch AdamW, gradient clipping, bf16; a sharded EMA (train.ema). All randomness (noise, times)
is a pure function of (seed, global batch index, sample), and the data position is one global count
of batches consumed, so a resumed run, also on another number of ranks, continues exactly.

Each stage starts from the previous stage's final weights (run.init_from: auto). Checkpoints every
run.save_every steps, on SIGTERM/SIGINT (save, then exit 0) and at the end (`final/`, with a diffusers
export); a re-run resumes from the latest checkpoint, and a finished stage is not trained twice.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from train import checkpoint as ckpt
from train import flow
from train.config import STAGES, TrainConfig, deepspeed_config
from train.config import load as load_config
from train.ema import ShardedEMA
from train.latent_cache import LatentCache
from train.model import NextDiT, NextDiT_configs
from train.stop import StopFlag
from unicap import config as uconfig
from unicap import distributed, runtime
from unicap.contract import checkpoint as contract


class TrainingError(RuntimeError):
    """The run cannot go on (missing previous stage, too many non-finite steps, ...); the message says why."""


# ---------------------------------------------------------------- setup


def previous_stage_final(cfg: TrainConfig) -> Path | None:
    """Where this stage's initial weights come from: None (random init) or a final/ folder."""
    src = cfg.run.init_from
    if src in (None, "none"):
        return None
    if src == "auto":
        i = STAGES.index(cfg.run.stage)
        if i == 0:
            return None
        folder = Path(cfg.run.out) / STAGES[i - 1] / contract.FINAL_DIR
        if not (folder / contract.STATE_FILE).is_file():
            raise TrainingError(f"{cfg.run.stage} starts from {STAGES[i - 1]}'s final weights, but {folder} "
                                f"holds none: run `make {STAGES[i - 1]}` first (or set run.init_from)")  # fmt: skip
        return folder
    folder = Path(src)
    if not (folder / contract.STATE_FILE).is_file():
        raise TrainingError(f"run.init_from {src}: not a checkpoint or final folder (no {contract.STATE_FILE})")
    return folder


def resume_folder(cfg: TrainConfig) -> Path | None:
    if cfg.run.resume == "never":
        return None
    if cfg.run.resume == "auto":
        return contract.latest_checkpoint(cfg.run_dir)
    folder = Path(cfg.run.resume)
    contract.read_state(folder)
    return folder


@dataclass
class Codecs:
    text: torch.nn.Module
    vae: torch.nn.Module
    latents: LatentCache = dataclasses.field(default_factory=lambda: LatentCache(0))  # 0 bytes: encodes every batch


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


# ---------------------------------------------------------------- the step


def sample_seed(seed: int, g: int) -> int:
    """The seed of global batch g's noise and times: the same on any rank and world size."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{g}".encode()).digest()[:8], "little") & (2**63 - 1)


def flow_batch(codecs: Codecs, batch: dict, cfg: TrainConfig, device: str):
    """A loader batch -> (x_t, t, features, mask, target velocity) for the model."""

    def encode(images: torch.Tensor) -> torch.Tensor:
        return codecs.vae.encode(images.to(device, non_blocking=True))

    images = batch["images"]  # the cache (data.latent_cache_mb) encodes only the samples it has not seen
    x1 = codecs.latents.encode(encode, images, batch.get("keys", []), tuple(images.shape[-2:])).float()  # (B, C, h, w)
    feats, mask = codecs.text(batch["captions"])  # (B, L, D), (B, L)
    # drawn on the CPU, so that a run's noise is the same on any device, then moved
    gen = torch.Generator(device="cpu").manual_seed(sample_seed(cfg.run.seed, int(batch["g"])))
    x0 = torch.randn(x1.shape, generator=gen, device="cpu").to(device, non_blocking=True)
    tokens = (x1.shape[-2] // 2) * (x1.shape[-1] // 2)
    mu = flow.shift_mu(tokens) if cfg.loss.time_shift else None
    t = flow.sample_t(x1.shape[0], dist=cfg.loss.time_dist, loc=cfg.loss.time_loc, scale=cfg.loss.time_scale,
                      mu=mu, generator=gen).to(device, non_blocking=True)  # fmt: skip
    xt, v = flow.interpolate(x0, x1, t)
    return xt, t, feats, mask, v


def placeholder_batch(batch: dict, cfg: TrainConfig) -> dict:
    """One grey image of the batch's bucket with an empty caption, for a batch whose samples were all
    unreadable: its loss is multiplied by 0, so the step's gradients come from the other ranks only."""
    w, h = batch.get("bucket") or (cfg.data.resolution, cfg.data.resolution)
    return {**batch, "images": torch.zeros(1, 3, h, w, device="cpu"), "captions": [""], "keys": []}


class GradGuard:
    """Tensor hooks that zero non-finite gradient entries before ZeRO reduces them, and remember that
    they did: a step with a non-finite loss or gradient is then skipped without touching the weights.

    The flag lives on the parameters' device and is or-ed in place: no host sync and no copy in the
    backward pass; the step reads it once, inside its one collective (distributed.agree)."""

    def __init__(self, module: torch.nn.Module):
        params = [p for p in module.parameters() if p.requires_grad]
        self.bad = torch.zeros((), dtype=torch.bool, device=params[0].device if params else "cpu")
        self.handles = [p.register_hook(self._hook) for p in params]

    def _hook(self, g: torch.Tensor) -> torch.Tensor:
        if self.bad.device != g.device:  # DeepSpeed moved the module after the guard was made
            self.bad = self.bad.to(g.device)
        # the sum is NaN or inf whenever an entry is (or when finite entries overflow it: a gradient past 3e38 is
        # as bad): one reduction, where isfinite(g).all() makes a boolean copy first (half the hook's cost on CPU)
        self.bad.logical_or_(torch.isfinite(g.sum()).logical_not_())
        return torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)

    def take(self) -> torch.Tensor:
        """This rank's flag since the last take (a 0-d device tensor), and a fresh one."""
        bad, self.bad = self.bad, torch.zeros_like(self.bad)
        return bad


@dataclass
class StepResult:
    loss: float  # mean over the global batch (nan when skipped)
    grad_norm: float
    samples: int  # global
    skipped_samples: int  # global
    finite: bool
    stop: bool = False  # some rank asked to stop (signal or stop file): agreed in the step's collective


def train_step(engine, codecs: Codecs, micro_batches: list[dict], cfg: TrainConfig, device: str,
               guard: GradGuard, key_log=None, stop_asked=False) -> StepResult:  # fmt: skip
    """One optimizer step over this rank's micro-batches (forward, backward, DeepSpeed step).

    A non-finite loss or gradient on any rank runs the optimizer with lr 0, so the weights stay as they were;
    the caller counts it and stops after run.max_nonfinite in a row. What the ranks agree on (that flag, the
    loss, the sample counts, a stop request) travels in ONE collective before the optimizer step, and the
    losses stay on the device until then: one host sync per step, not one per micro-batch."""
    dtype = next(engine.module.parameters()).dtype
    loss_sum = torch.zeros((), dtype=torch.float32, device=device)
    bad_loss = torch.zeros((), dtype=torch.bool, device=device)
    losses, samples, skipped = 0, 0, 0
    for i, batch in enumerate(micro_batches):
        empty = len(batch["captions"]) == 0  # every sample of it was unreadable: still join the collectives
        if empty:
            batch = placeholder_batch(batch, cfg)
        xt, t, feats, mask, v = flow_batch(codecs, batch, cfg, device)
        pred = engine(xt.to(dtype), t, feats.to(dtype), mask)
        loss = flow.flow_loss(pred, v, lowres_weight=cfg.loss.lowres_weight)
        finite = torch.isfinite(loss)
        # a non-finite loss backpropagates zero (the guard cleans what flows back); the step is skipped below
        engine.backward(loss * 0.0 if empty else torch.where(finite, loss, loss * 0.0))
        if not empty:
            bad_loss.logical_or_(finite.logical_not())
            loss_sum += torch.nan_to_num(loss.detach().float())
            losses += 1
            samples += len(batch["captions"])
        if key_log is not None:
            key_log.write(" ".join(batch["keys"]) + "\n")
        skipped += int(batch.get("skipped", 0))
        if i < len(micro_batches) - 1:
            engine.step()  # DeepSpeed counts micro-steps; only the boundary one updates
    asked = stop_asked() if callable(stop_asked) else stop_asked  # read now: a signal during this step counts
    total, flags = distributed.agree([loss_sum, losses, samples, skipped], flags=[bad_loss, guard.take(), asked])
    finite = not (flags[0] or flags[1])
    groups = engine.optimizer.param_groups
    saved_lr = [g["lr"] for g in groups]
    if not finite:
        for g in groups:
            g["lr"] = 0.0  # AdamW with lr 0: no decay, no update; the master weights stay bitwise the same
    engine.step()
    if not finite:
        for g, lr in zip(groups, saved_lr, strict=True):
            if g["lr"] == 0.0:  # (the scheduler, when it stepped, already set the next step's lr)
                g["lr"] = lr
    norm = engine.get_global_grad_norm()
    return StepResult(loss=total[0] / max(total[1], 1) if finite else math.nan,
                      grad_norm=float(norm) if norm is not None else math.nan,
                      samples=int(total[2]), skipped_samples=int(total[3]), finite=finite, stop=flags[2])  # fmt: skip


# ---------------------------------------------------------------- samples


def sample_grid(cfg: TrainConfig, ema_state: dict, model_cfg, codecs: Codecs, path: Path):
    """A grid of samples from the fixed prompts with the EMA weights (rank 0); returns the PIL image."""
    from PIL import Image

    from train.sample import generate

    codec = next(codecs.vae.parameters())
    model = NextDiT(model_cfg)
    model.load_state_dict(ema_state)
    model = model.to(codec.device, codec.dtype).eval()  # where the codecs are, in their dtype (bf16 on GPUs)
    side = cfg.data.resolution
    images = generate(model, codecs.text, codecs.vae, list(cfg.run.sample_prompts), width=side, height=side,
                      steps=cfg.run.sample_steps, cfg_scale=cfg.run.sample_cfg, seed=cfg.run.seed)  # fmt: skip
    grid = Image.new("RGB", (side * len(images), side), "white")
    for i, im in enumerate(images):
        grid.paste(im, (i * side, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return grid


# ---------------------------------------------------------------- the run


def train(cfg: TrainConfig) -> int:
    import deepspeed

    from train.data import make_loader

    device = runtime.resolve_device("auto")
    # auto -> bf16 on CUDA and bf16-native CPUs, else fp32 (emulated bf16 is ~30x slower): config.yaml says which
    cfg.deepspeed.precision = runtime.resolve_precision(cfg.deepspeed.precision, device)
    run_dir = cfg.run_dir
    final = run_dir / contract.FINAL_DIR
    # refusals first: before any rank starts a process group or loads a model
    if not ((final / contract.STATE_FILE).is_file() and contract.read_state(final)["step"] >= cfg.run.steps):
        resume = resume_folder(cfg)
        init = None if resume else previous_stage_final(cfg)
        if not cfg.data.packed or not Path(cfg.data.packed).is_dir():
            raise TrainingError(f"data.packed {cfg.data.packed!r} is not a folder: pack the stage first (unicap pack)")
    rank, world = distributed.init(device)
    if (final / contract.STATE_FILE).is_file() and contract.read_state(final)["step"] >= cfg.run.steps:
        if rank == 0:
            print(f"[{cfg.run.stage}] already trained: {final} (delete it to train again)")
        return 0

    codecs = load_codecs(cfg, device)
    model = build_model(cfg, codecs.text.dim)
    source = resume or init
    if source is not None:
        model.load_state_dict(ckpt.module_weights(source))
    accum = cfg.grad_accum(world)
    start = contract.read_state(resume) if resume else None
    start_step = start["step"] if start else 0
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps,
                            weight_decay=cfg.optim.weight_decay)  # fmt: skip
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, start_step))
    ds_config = deepspeed_config(cfg, world, device)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds_config)
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
    base["initialised_from"] = start.get("initialised_from") if start else (str(init.resolve()) if init else None)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        uconfig.save(cfg, run_dir / "config.yaml")
        how = f"resuming {resume}" if resume else f"from {init}" if init else "from random init"
        print(f"[{cfg.run.stage}] {cfg.model.name} on {world} rank(s) ({device}), global batch "
              f"{cfg.data.micro_batch} x {accum} x {world} = {cfg.global_batch(world)}, ZeRO-{cfg.deepspeed.zero_stage}, "
              f"{cfg.deepspeed.precision}; steps {start_step} -> {cfg.run.steps}; {how}", flush=True)  # fmt: skip

    loader = make_loader(cfg.data, seed=cfg.run.seed, rank=rank, world_size=world, start=counters["batches_consumed"])
    batches = iter(loader)
    writer = _tensorboard(cfg, run_dir) if rank == 0 else None
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
                    print(f"[{cfg.run.stage}] step {step}: non-finite loss or gradient; step skipped, weights unchanged",
                          flush=True)  # fmt: skip
                if bad_in_row >= cfg.run.max_nonfinite:
                    ckpt.save_checkpoint(engine, ema, run_dir, state(), cfg.run.keep_last)
                    raise TrainingError(f"{bad_in_row} non-finite steps in a row (run.max_nonfinite): stopping; the "
                                        "last good weights are in the checkpoint. Lower optim.lr or check the data.")  # fmt: skip
            now = time.time()
            if rank == 0:
                rate = res.samples / max(now - t_last, 1e-9)
                _log(writer, bar, step, res, rate, engine.get_lr()[0], counters, metrics)
            t_last = now
            if cfg.run.sample_every and step % cfg.run.sample_every == 0 and step < cfg.run.steps:
                _samples(cfg, ema, engine, codecs, run_dir, step, writer, rank)
            stopping = res.stop
            if step % cfg.run.save_every == 0 or stopping:
                folder = ckpt.save_checkpoint(engine, ema, run_dir, state(), cfg.run.keep_last)
                last_saved = step
                if rank == 0 and stopping:
                    print(f"[{cfg.run.stage}] stopped {stop.why()} at step {step}; checkpoint {folder}; "
                          "run the same command to resume", flush=True)  # fmt: skip
                if stopping:
                    if writer is not None:
                        writer.close()
                    return 0
    if bar is not None:
        bar.close()
    if last_saved != step:
        ckpt.save_checkpoint(engine, ema, run_dir, state(), cfg.run.keep_last)

    out = ckpt.save_final(engine, ema, run_dir, state())
    if rank == 0:
        from train.convert import export_diffusers, not_in_diffusers

        if reason := not_in_diffusers(model.cfg):
            print(f"[{cfg.run.stage}] no diffusers export: {reason}", flush=True)
        else:
            export_diffusers(out)
    _samples(cfg, ema, engine, codecs, run_dir, step, writer, rank)
    if rank == 0:
        print(f"[{cfg.run.stage}] done: {step} steps, {counters['samples_seen']} samples "
              f"({counters['skipped_samples']} skipped), {counters['skipped_steps']} steps skipped; weights {out}", flush=True)  # fmt: skip
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

    return tqdm(total=cfg.run.steps, initial=start_step, desc=cfg.run.stage, unit="step", dynamic_ncols=True,
                file=sys.stdout)  # fmt: skip


def _log(writer, bar, step: int, res: StepResult, rate: float, lr: float, counters: dict, metrics) -> None:
    metrics.write(json.dumps({"step": step, "loss": res.loss if res.finite else None, "grad_norm": res.grad_norm
                              if math.isfinite(res.grad_norm) else None, "lr": lr, "samples_per_s": round(rate, 3),
                              "samples": res.samples, "finite": res.finite, **counters}) + "\n")  # fmt: skip
    metrics.flush()
    if bar is not None:
        bar.update(1)
        bar.set_postfix(loss=f"{res.loss:.4f}", samples_s=f"{rate:.1f}", refresh=False)
    if writer is not None:
        for name, value in (("train/loss", res.loss), ("train/grad_norm", res.grad_norm), ("train/lr", lr),
                            ("train/samples_per_s", rate), ("data/skipped_samples", counters["skipped_samples"]),
                            ("train/skipped_steps", counters["skipped_steps"])):  # fmt: skip
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
