"""The trainer's step: a loader batch -> the flow objective's inputs, and one optimizer step over this
rank's micro-batches (train.trainer runs it in its loop; tests and bench/bench_trainer.py call it on their own).

    codecs = train.trainer.load_codecs(cfg, device)  # the frozen text encoder and VAE
    guard = GradGuard(engine.module)  # before the first backward: zeroes and flags non-finite gradients
    res = train_step(engine, codecs, micro_batches, cfg, device, guard)  # StepResult: agreed by every rank

Noise and times are a pure function of (run.seed, global batch index): `sample_seed`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass

import torch

from train import flow
from train.config import TrainConfig
from train.latent_cache import LatentCache
from unicap import distributed


@dataclass
class Codecs:
    text: torch.nn.Module
    vae: torch.nn.Module
    latents: LatentCache = dataclasses.field(default_factory=lambda: LatentCache(0))  # 0 bytes: encodes every batch


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
    t = flow.sample_t(
        x1.shape[0], dist=cfg.loss.time_dist, loc=cfg.loss.time_loc, scale=cfg.loss.time_scale, mu=mu, generator=gen
    ).to(device, non_blocking=True)
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


def train_step(
    engine,
    codecs: Codecs,
    micro_batches: list[dict],
    cfg: TrainConfig,
    device: str,
    guard: GradGuard,
    key_log=None,
    stop_asked=False,
) -> StepResult:
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
    return StepResult(
        loss=total[0] / max(total[1], 1) if finite else math.nan,
        grad_norm=float(norm) if norm is not None else math.nan,
        samples=int(total[2]),
        skipped_samples=int(total[3]),
        finite=finite,
        stop=flags[2],
    )
