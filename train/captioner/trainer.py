"""The captioner trainer: supervised fine-tuning of a Qwen2-VL on caption turns, with DeepSpeed.

    unicap train-captioner --config train/configs/captioner_tiny.yaml [--nproc 2] [key=value ...]
    torchrun --nproc_per_node 2 -m train.captioner.trainer --config train/configs/captioner_tiny.yaml run.steps=20
    deepspeed --num_gpus 8 --module train.captioner.trainer --config my_qwen2vl_2b.yaml

Per optimizer step: grad_accum micro-batches per rank, each `data.micro_batch` images with their caption turns
packed per image (train.captioner.data); loss on the answers and their end token only (train.captioner.model),
plus the grounding losses when configured; ZeRO with a torch AdamW, gradient clipping, bf16 or fp32; warmup,
then cosine or constant. The data position is one global count of images consumed, every sample a pure
function of its index, so a resumed run (also on another number of ranks) continues exactly.

Run folder (run.out: a local folder, or a URI such as s3://bucket/runs/captioner):
    config.yaml                          the resolved config
    metrics.jsonl                        one line per logged step
    checkpoints/step-00000200/           model.safetensors (fp32 master weights, module names), optimizer.safetensors
                                         (AdamW moments), state.json: written under a hidden name, then renamed
    final/                               the trained model: a folder vLLM and transformers load as they are
                                         (train.captioner.export), with unicap_captioner.json (provenance)
A re-run resumes from the latest checkpoint; a run whose final/ holds run.steps is not trained twice.

With a URI run.out the nodes share no disk (train.captioner.store, after train.run_store): every node trains in a
local working copy under $UNICAP_CACHE/runs/, rank 0 uploads each checkpoint with its state.json last (the commit
object: a step folder without it does not count) and final/ with unicap_captioner.json last; a run resumes from
the bucket's latest committed checkpoint, also on a node that never saw it. A bucket that is missing or cannot be
written is refused in one line at start-up.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from train import run_store, zero
from train.captioner import data as cdata
from train.captioner.base import resolve_base
from train.captioner.checkpoint import TrainingError, checkpoint_weights, load_checkpoint, read_state, save_checkpoint
from train.captioner.config import CaptionerConfig, deepspeed_config
from train.captioner.config import load as load_config
from train.captioner.model import PART_NAMES, CaptionerModule
from train.captioner.store import CaptionerRunStore
from train.stop import StopFlag
from unicap import config as uconfig
from unicap import distributed, runtime
from unicap.contract import checkpoint as contract
from unicap.storage import Location

FINAL_DIR = "final"


# ---------------------------------------------------------------- setup


def resume_folder(cfg: CaptionerConfig, store: CaptionerRunStore) -> Path | Location | None:
    """The checkpoint to resume from: the run folder's latest complete one (in the bucket, for a URI run.out)."""
    if cfg.run.resume == "never":
        return None
    if cfg.run.resume == "auto":
        return contract.latest_checkpoint(store.run_dir)
    folder = run_store.folder(cfg.run.resume)
    read_state(folder)
    return folder


def resume_base(recorded: str, cfg: CaptionerConfig) -> str:
    """The base model a checkpoint was trained from, on this machine. A tiny base lives in each machine's cache
    under a name that hashes its spec, so a run resumed on a node that never saw it (a URI run.out) builds the
    same one here; a local folder that only another machine holds is refused in one line."""
    path = Path(recorded)
    if not path.is_absolute() or path.is_dir():
        return recorded  # a hub id, or a folder this machine has
    if cfg.model.init == "tiny":
        here = resolve_base(cfg.model.init, cfg.model.arch, cfg.model.seed)
        if Path(here).name == path.name:
            return here
    raise TrainingError(
        f"the checkpoint was trained from the base model {recorded}, which this machine lacks: "
        "put that folder there (or set model.init to the same tiny base)"
    )


def load_vlm(path: str, cfg: CaptionerConfig):
    """The Qwen2-VL-family model of a folder or hub id (its own class: Qwen2-VL, Qwen2.5-VL), fp32 master."""
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(
        path, dtype=torch.float32, attn_implementation=cfg.model.attn_implementation
    )


def make_source(cfg: CaptionerConfig):
    d = cfg.data
    if d.source == "synth":
        return cdata.SynthSource(d.synth_seed, d.max_pixels, d.canonical_order, d.single_group_until)
    cols = [c for lv in d.levels for c in (f"caption_{lv}_{lang}" for lang in d.languages)]
    return cdata.FolderSource(d.captions, d.shards, cfg.run.seed, d.max_pixels, cols)


class TurnDataset(torch.utils.data.Dataset):
    """Global sample index -> a packed row (every sample a pure function of its index)."""

    def __init__(self, cfg: CaptionerConfig, base: str):
        from transformers import AutoImageProcessor, AutoTokenizer

        self.cfg = cfg
        tokenizer = AutoTokenizer.from_pretrained(base)
        processor = AutoImageProcessor.from_pretrained(base, max_pixels=cfg.data.max_pixels)
        self.encoder = cdata.ChatEncoder(tokenizer, processor, cfg.data.levels, cfg.data.languages)
        self.source = make_source(cfg)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, g: int) -> cdata.Row:
        sample = self.source.sample(g)
        columns = [c for c in self.encoder.branch if c in sample.captions]
        return self.encoder.encode(
            sample, cdata.pick_columns(columns, self.cfg.data.turns_per_image, self.cfg.run.seed, g)
        )


class RankBatches(torch.utils.data.Sampler):
    """This rank's micro-batches of global sample indices, from global micro-batch `start_micro` on:
    micro-batch j covers images [j x world x mb, (j + 1) x world x mb), rank r the r-th mb of them."""

    def __init__(self, micro_batch: int, rank: int, world: int, start_micro: int, count: int):
        self.mb, self.rank, self.world, self.start, self.count = micro_batch, rank, world, start_micro, count

    def __iter__(self):
        for j in range(self.start, self.start + self.count):
            first = j * self.world * self.mb + self.rank * self.mb
            yield list(range(first, first + self.mb))

    def __len__(self) -> int:
        return self.count


def lr_factor(cfg: CaptionerConfig, step: int) -> float:
    """Warmup then cosine (to min_lr_ratio) or constant, as a function of the global step. With
    optim.ground_first_steps G, steps < G (vision grounding alone) warm up and stay constant, and the
    language model's schedule runs over steps G .. run.steps."""
    o = cfg.optim
    ground = o.ground_first_steps
    if step < ground:
        return min(1.0, (step + 1) / max(1, min(o.warmup_steps, ground)))
    step, total = step - ground, cfg.run.steps - ground
    if step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return 1.0
    done = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
    return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * done))


# ---------------------------------------------------------------- the step


def train_step(
    engine, micro_batches: list[dict], cfg: CaptionerConfig, ground_only: bool = False, flags: tuple = ()
) -> dict:
    """One optimizer step over this rank's micro-batches; returns global mean losses (`loss`: the captions';
    nan in a grounding-only step) and, under "flags", `flags` or-ed over the ranks. The losses stay on the
    device; they and the flags reach every rank in one collective (unicap.distributed.agree)."""
    device = next(engine.module.parameters()).device
    keys = ("loss", *PART_NAMES)  # one layout on every rank, whichever losses each rank's batches had
    sums = {k: torch.zeros((), device=device) for k in keys}
    counts = dict.fromkeys(keys, 0)
    for i, batch in enumerate(micro_batches):
        batch = _to(batch, device)
        caption, parts = engine(batch, ground_only=ground_only)
        ground = cfg.optim.ground_weight * sum(parts.values()) if parts else 0.0
        engine.backward(ground if caption is None else caption + ground)
        for k, v in ({"loss": caption} if caption is not None else {}).items() | parts.items():
            sums[k] += v.detach().float()
            counts[k] += 1
        if i < len(micro_batches) - 1:
            engine.step()
    engine.step()
    flags = [f() if callable(f) else f for f in flags]  # read now: a signal during this step counts
    totals, agreed = distributed.agree([*(sums[k] for k in keys), *(counts[k] for k in keys)], flags=flags)
    n = len(keys)
    out = {k: totals[i] / totals[n + i] for i, k in enumerate(keys) if totals[n + i] > 0}
    out.setdefault("loss", math.nan)  # a grounding-only step
    norm = engine.get_global_grad_norm()
    out["grad_norm"] = float(norm) if norm is not None else math.nan
    out["flags"] = agreed
    return out


def _to(batch: dict, device) -> dict:
    out = {}
    for k, v in batch.items():
        out[k] = {kk: vv.to(device) for kk, vv in v.items()} if isinstance(v, dict) else v.to(device)
    return out


# ---------------------------------------------------------------- the run


def train(cfg: CaptionerConfig) -> int:
    import deepspeed

    from train.captioner.export import export_folder

    device = runtime.resolve_device("auto")
    # auto -> bf16 on CUDA and bf16-native CPUs, else fp32 (emulated bf16 is ~30x slower): config.yaml says which
    cfg.deepspeed.precision = runtime.resolve_precision(cfg.deepspeed.precision, device)
    store = CaptionerRunStore(cfg.run.out)  # run.out a URI: a local working copy, published by rank 0
    run_dir, final = store.local, store.local / FINAL_DIR
    # refusals first: before any rank starts a process group or loads a model
    if store.remote is not None and os.environ.get("RANK", "0") == "0":
        store.check_writable()  # a missing bucket, no credentials, no permission: one line, before training
    done = store.final_provenance()
    if done and done["step"] >= cfg.run.steps:
        shown = run_store.describe(store.run_dir_join(FINAL_DIR))
        print(f"[captioner] already trained: {shown} (delete it to train again)")
        return 0
    resume = resume_folder(cfg, store)
    rank, world = distributed.init(device, timeout_s=cfg.run.init_timeout_s)  # collective_timeout_s after step 1
    origin = run_store.describe(resume) if resume else None
    resume, _ = store.fetch(resume, None)  # a checkpoint in a bucket: downloaded once per node (collective)
    if cfg.run.threads and not device.startswith("cuda"):
        torch.set_num_threads(cfg.run.threads)
    if resume:
        base = resume_base(read_state(resume)["base"], cfg)
    else:
        base = resolve_base(cfg.model.init, cfg.model.arch, cfg.model.seed)
    torch.manual_seed(cfg.run.seed)  # the same grounding-head init on every rank
    module = CaptionerModule(load_vlm(base, cfg), grounding=cfg.model.grounding, cell_layer=cfg.model.cell_layer)
    if resume:
        module.load_state_dict(checkpoint_weights(resume))
    if cfg.model.freeze_vision:
        for p in module.vlm.model.visual.blocks.parameters():
            p.requires_grad_(False)
        module.vlm.model.visual.patch_embed.requires_grad_(False)
    module.to(device)
    accum = cfg.grad_accum(world)
    state = read_state(resume) if resume else {"step": 0, "samples_consumed": 0, "train_seconds": 0.0}
    vision = {id(p) for p in module.vlm.model.visual.parameters()}
    vision |= {id(p) for p in module.ground.parameters()} if module.ground is not None else set()
    trainable = [p for p in module.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if id(p) not in vision], "lr": cfg.optim.lr},
        {"params": [p for p in trainable if id(p) in vision], "lr": cfg.optim.lr * cfg.optim.vision_lr_scale},
    ]
    nonempty = [g for g in groups if g["params"]]
    opt = torch.optim.AdamW(nonempty, betas=cfg.optim.betas, eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
    start_step = state["step"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_factor(cfg, start_step + i))
    ds_config = deepspeed_config(cfg, world, device)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=opt, lr_scheduler=sched, config=ds_config)
    distributed.set_timeout(cfg.run.init_timeout_s)  # DeepSpeed's own groups start at torch's default
    # AdamW's state exists from the start and is linked to ZeRO's fragments now: a parameter group without
    # gradients at the first step (the language model during optim.ground_first_steps) would stay unlinked
    zero.ensure_optimizer_state(engine)
    if resume:
        load_checkpoint(engine, resume)
    dataset = TurnDataset(cfg, base)
    per_rank_micro = (cfg.run.steps - start_step) * accum
    start_micro = state["samples_consumed"] // (cfg.data.micro_batch * world)
    if state["samples_consumed"] % (cfg.data.micro_batch * world):
        raise TrainingError(
            f"{resume}: {state['samples_consumed']} samples consumed is not a whole number of "
            f"micro-batches of {cfg.data.micro_batch} x {world} ranks: resume with the same micro_batch"
        )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=RankBatches(cfg.data.micro_batch, rank, world, start_micro, per_rank_micro),
        collate_fn=functools.partial(cdata.collate, pad_id=dataset.encoder.pad),
        num_workers=cfg.data.num_workers,
        persistent_workers=False,
        multiprocessing_context="spawn" if cfg.data.num_workers else None,
        timeout=cfg.run.init_timeout_s if cfg.data.num_workers else 0,  # a fetch that never returns raises
    )
    batches = iter(loader)
    fixed = {"base": base, "world_size": world, "config": uconfig.to_dict(cfg)}
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        uconfig.save(cfg, run_dir / "config.yaml")
        store.publish_logs()  # a URI run folder: config.yaml there from the start
        n_params = sum(p.numel() for p in module.vlm.parameters())
        how = f"resuming {origin}" if resume else f"from {base}"
        global_batch = f"{cfg.data.micro_batch} x {accum} x {world} = {cfg.global_batch(world)} images"
        print(
            f"[captioner] {n_params / 1e6:.2f}M-parameter Qwen2-VL on {world} rank(s) ({device}), "
            f"global batch {global_batch}, ZeRO-{cfg.deepspeed.zero_stage}, {cfg.deepspeed.precision}; "
            f"steps {start_step} -> {cfg.run.steps}; {how}",
            flush=True,
        )
    metrics = open(run_dir / "metrics.jsonl", "a") if rank == 0 else None  # noqa: SIM115 - one line per log
    bar = None
    if rank == 0 and cfg.run.progress:
        from tqdm import tqdm

        bar = tqdm(
            total=cfg.run.steps, initial=start_step, desc="captioner", unit="step", dynamic_ncols=True, file=sys.stdout
        )
    with StopFlag(cfg.run.stop_file, grace_s=cfg.run.term_grace_s) as stop:
        step, t_last = start_step, time.time()
        seconds = state["train_seconds"]

        def current() -> dict:
            return {
                **fixed,
                "step": step,
                "samples_consumed": state["samples_consumed"],
                "train_seconds": round(seconds, 1),
            }

        while step < cfg.run.steps:
            micro = [next(batches) for _ in range(accum)]
            out_of_time = bool(cfg.run.max_minutes) and seconds - state["train_seconds"] > cfg.run.max_minutes * 60
            ground_only = step < cfg.optim.ground_first_steps
            res = train_step(engine, micro, cfg, ground_only=ground_only, flags=(out_of_time, stop.asked))
            out_of_time, stopping = res.pop("flags")
            stop.answer(stopping)  # every rank reached this boundary: progress for the SIGTERM watchdog
            step += 1
            distributed.heartbeat(step)  # the step a peer names if this rank stops answering
            if step == start_step + 1:  # start-up is over: a peer that stops answering ends the job within seconds
                distributed.set_timeout(cfg.run.collective_timeout_s)
            state["samples_consumed"] += cfg.global_batch(world)
            now = time.time()
            seconds += now - t_last
            t_last = now
            if not math.isfinite(res["loss"]) and step > cfg.optim.ground_first_steps:  # agreed: all ranks stop
                raise TrainingError(f"step {step}: non-finite loss; lower optim.lr")
            if rank == 0:
                if step % cfg.run.log_every == 0 or step == cfg.run.steps:
                    losses = {k: round(v, 5) if math.isfinite(v) else None for k, v in res.items()}
                    row = {"step": step, "lr": engine.get_lr()[0], "seconds": round(seconds, 1), **losses}
                    metrics.write(json.dumps(row) + "\n")
                    metrics.flush()
                if bar is not None:
                    bar.update(1)
                    shown = (
                        res["loss"]
                        if math.isfinite(res["loss"])
                        else sum(v for k, v in res.items() if k not in ("loss", "grad_norm"))
                    )
                    bar.set_postfix(loss=f"{shown:.3f}", refresh=False)
                elif step % cfg.run.log_every == 0:
                    print(f"step {step} loss {res['loss']:.4f} ({seconds:.0f}s)", flush=True)
            if out_of_time:
                if rank == 0:
                    print(
                        f"[captioner] run.max_minutes {cfg.run.max_minutes} reached at step {step}: stopping, "
                        "exporting what there is",
                        flush=True,
                    )
                fixed["stopped_early"] = True
                break
            if step % cfg.run.save_every == 0 or stopping:
                with distributed.patient(cfg.run.init_timeout_s):  # full tensors gathered and written
                    folder = save_checkpoint(engine, run_dir, current(), cfg.run.keep_last, publish=store)
                if stopping:
                    if rank == 0:
                        print(
                            f"[captioner] stopped {stop.why()} at step {step}; checkpoint {store.show(folder)}; "
                            "rerun to resume",
                            flush=True,
                        )
                    return 0
    if bar is not None:
        bar.close()
    distributed.set_timeout(cfg.run.init_timeout_s)  # the last checkpoint and the export gather full tensors
    save_checkpoint(engine, run_dir, current(), cfg.run.keep_last, publish=store)
    params = {n: zero.full_master(p) for n, p in zero.trainable(engine.module)}
    if rank == 0:
        full = {n: t.detach().float().cpu() for n, t in module.state_dict().items()} | params
        vlm_weights = {k.removeprefix("vlm."): v for k, v in full.items() if k.startswith("vlm.")}
        out = export_folder(base, vlm_weights, final, provenance=current(), dtype=cfg.model.export_dtype)
        store.publish_final()  # a URI run folder: the logs, then final/ with unicap_captioner.json last
        print(
            f"[captioner] done: {step} steps, {state['samples_consumed']} images, {seconds:.0f}s of training; "
            f"model folder {store.show(out)}",
            flush=True,
        )
    distributed.barrier()
    return 0


def parse_args(argv: list[str] | None = None) -> CaptionerConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="a YAML file (train/configs/captioner_*.yaml); key=value arguments override it")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="key=value, e.g. optim.lr=1e-4 run.steps=50")
    args = p.parse_args(argv)
    return load_config(args.config, args.overrides)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return train(parse_args(argv))
    except (TrainingError, uconfig.ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(distributed.run_main(main))
