"""The trainer's configuration: one typed dataclass, read from YAML, overridable from the command line.

    deepspeed --module train.trainer --config train/configs/stage1_cpu.yaml optim.lr=1e-4 run.steps=50

Defaults below are the paper's / the release's settings (Lumina-Image 2.0 `finetune.py`: AdamW lr 2e-4,
betas (0.9, 0.95), eps 1e-15, weight decay 0, no schedule, grad clip 2.0, EMA every step, 4x-pooled
auxiliary loss, 10% caption dropout). `train/configs/*.yaml` change what a stage or a machine needs,
with the batch arithmetic written beside them. The DeepSpeed config is derived from this object
(`deepspeed_config`), never kept as a second file; the resolved config is saved into the run folder
and into every checkpoint.

Batch arithmetic: global batch = data.micro_batch x grad_accum x world size. Set `data.global_batch`
and grad_accum follows from the world size (so a run resumed on another number of ranks keeps its
global batch and sees exactly the samples the uninterrupted run would have), or leave it unset and
set `optim.grad_accum`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from train.config_base import TrainerConfig
from unicap import config as uconfig

STAGES = ("stage1", "stage2", "stage3")


@dataclass
class ModelConfig:
    name: str = "NextDiT_2B"  # a key of train.model.NextDiT_configs
    attention: str = "auto"  # auto | sdpa | flash_varlen | torch_varlen
    activation_checkpointing: bool = False
    compile: bool = False  # regional torch.compile of every block
    text_encoder: str = "google/gemma-2-2b"  # hub id, local folder, or "tiny" (built offline)
    vae: str = "black-forest-labs/FLUX.1-dev"
    text_max_length: int = 256
    rope_theta: float | None = None  # RoPE base; None: the named model's (10,000, the release's)
    frame_pos: bool | None = None  # a fixed code of each image token's place in the frame; None: the named model's


@dataclass
class DataConfig:
    packed: str = ""  # the stage's packed training shards (pipelines.pack output)
    resolution: int = 256  # buckets hold about resolution^2 pixels
    micro_batch: int = 4  # per rank, per forward
    global_batch: int | None = None  # if set: grad_accum = global_batch / (micro_batch x world)
    num_workers: int = 2  # DataLoader worker processes per rank
    prefetch_factor: int = 2
    # a caption per sample: level drawn with these weights, then language; missing ones are redrawn
    level_weights: dict[str, float] = field(
        default_factory=lambda: {"long": 0.4, "medium": 0.3, "short": 0.2, "tags": 0.1}
    )
    language_weights: dict[str, float] = field(default_factory=lambda: {"en": 0.5, "zh": 0.5})
    original_caption_weight: float = 0.0  # share of samples trained on the alt text instead
    caption_dropout: float = 0.1  # empty caption (the system prompt stays) for classifier-free guidance
    # one level x language draw per micro-batch instead of per sample (each sample's odds unchanged): captions of
    # one micro-batch then have similar lengths, so less padding where attention pads (sdpa; not varlen flash-attn)
    group_caption_levels: bool = False
    latent_cache_mb: int = 0  # per rank: VAE latents of samples seen before (train/latent_cache.py); 0 = off
    # data.packed a URI (s3://...): each node caches the packed files its ranks read (train/packed_cache.py)
    cache_dir: str | None = None  # node-local, shared by the node's ranks; unset: $UNICAP_CACHE/packed or ~/.cache/...
    cache_gb: float | None = None  # LRU limit of cache_dir in GB; unset: the whole stage (no file fetched twice)
    cache_prefetch: int = 8  # this rank's upcoming micro-batches whose files its loader workers fetch ahead


@dataclass
class OptimConfig:
    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-15
    weight_decay: float = 0.0
    warmup_steps: int = 0  # linear warmup, then constant (the release has no schedule)
    grad_accum: int = 1  # used when data.global_batch is unset
    grad_clip: float = 2.0
    ema_decay: float = 0.9999
    load_optimizer: bool = False  # when starting from the previous stage: keep its optimizer state too


@dataclass
class LossConfig:
    time_dist: str = "logit_normal"  # logit_normal | uniform
    time_loc: float = 0.0
    time_scale: float = 1.0
    time_shift: bool = True  # resolution-dependent shift from the image token count
    lowres_weight: float = 1.0  # + the loss on 4x average-pooled velocities (the release adds it)


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 2  # 2 (default) or 3 (parameters sharded too)
    precision: str = "auto"  # auto (bf16 on CUDA and bf16-native CPUs, else fp32) | bf16 | fp32
    overlap_comm: bool = True
    reduce_bucket_size: int = 200_000_000


@dataclass
class RunConfig:
    stage: str = "stage1"
    out: str = "runs"  # the stage's run folder is out/stage
    init_from: str | None = None  # consolidated weights to start from; "auto": the previous stage's final
    steps: int = 1000  # optimizer steps
    seed: int = 0
    save_every: int = 500  # steps between checkpoints (also on SIGTERM/SIGINT and at the end)
    keep_last: int = 3
    log_every: int = 10
    sample_every: int = 0  # steps between sample grids (0: only at the end)
    sample_prompts: list[str] = field(
        default_factory=lambda: [
            "a red circle on a white background",
            "两个蓝色的正方形",
            "a small green triangle in the top left",
        ]
    )
    # the grids' sampler (train/sample.py DEFAULT_SAMPLING, chosen in bench/results/sampling.json); the step cache
    # only with calibrated coefficients: the stage's final/ or its init weights' teacache.json (unicap calibrate-cache)
    sample_solver: str = "ab2"
    sample_steps: int = 20
    sample_cache_threshold: float = 0.0
    sample_cfg: float = 4.0
    max_nonfinite: int = 5  # consecutive non-finite losses/gradients before the run stops
    resume: str = "auto"  # auto (latest checkpoint of the run, if any) | never | a checkpoint folder
    progress: bool = True
    # stop at the next step with a checkpoint, as on SIGTERM, once this file exists (none: no file is watched)
    stop_file: str | None = None
    # after SIGTERM/SIGINT, seconds to reach a step boundary (and checkpoint) before the rank exits without one:
    # a launcher whose other rank died sends SIGTERM to ranks stuck in a collective that can never complete
    term_grace_s: float = 20.0  # (torchrun SIGKILLs its ranks 30 s after its own SIGTERM)
    # seconds a collective waits for its peers (unicap.distributed.set_timeout): init_timeout_s at start-up, around
    # checkpoints and the final export (full tensors gathered and written), collective_timeout_s after the first
    # step (torchtitan's 300 / 100). Past it the rank exits naming the rank that stopped answering.
    collective_timeout_s: float = 100.0
    init_timeout_s: float = 300.0
    log_keys: bool = False  # write the keys each rank trains on to run_dir/keys/ (coverage audits, tests)
    tensorboard: bool = True


@dataclass
class TrainConfig(TrainerConfig):
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self):
        if self.run.stage not in STAGES:
            raise ValueError(f"run.stage {self.run.stage!r}: one of {STAGES}")
        self.check_deepspeed()
        self.check_at_least_one("data.resolution")
        if self.data.latent_cache_mb < 0:
            raise ValueError(f"data.latent_cache_mb {self.data.latent_cache_mb}: 0 (off) or a size in MiB")
        if not 0.0 <= self.data.caption_dropout < 1.0:
            raise ValueError(f"data.caption_dropout {self.data.caption_dropout}: in [0, 1)")
        if not 0.0 <= self.optim.ema_decay < 1.0:
            raise ValueError(f"optim.ema_decay {self.optim.ema_decay}: in [0, 1)")
        if self.run.sample_prompts:  # a grid that cannot be drawn is refused before training, not after it
            from train.sampler import check_settings

            try:
                check_settings(self.run.sample_solver, self.run.sample_steps, self.run.sample_cache_threshold)
            except ValueError as e:
                raise ValueError(f"run.sample_solver / sample_steps / sample_cache_threshold: {e}") from None

    @property
    def run_dir(self) -> Path:
        return Path(self.run.out) / self.run.stage


def load(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    return uconfig.load(TrainConfig, path, overrides)


def deepspeed_config(cfg: TrainConfig, world_size: int, device: str | None = None) -> dict:
    """The DeepSpeed config, derived from the TrainConfig (never a second hand-kept file).

    The optimizer is a torch AdamW built by the trainer (no JIT-compiled fused optimizer on CPU);
    gradient clipping and accumulation are DeepSpeed's."""
    ds = cfg.deepspeed
    zero: dict = {"overlap_comm": ds.overlap_comm, "reduce_bucket_size": ds.reduce_bucket_size}
    zero["contiguous_gradients"] = True
    if ds.zero_stage == 3:
        zero |= {"stage3_gather_16bit_weights_on_model_save": False, "stage3_param_persistence_threshold": 0}
    # non-finite gradients are caught by the trainer's own guard (train.trainer.GradGuard) under every ZeRO
    # stage; DeepSpeed's bf16 overflow check would be a second pass over the gradients
    return cfg.deepspeed_config_with(world_size, device, zero, bf16={"check_grad_overflow": False})
