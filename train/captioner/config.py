"""The captioner trainer's configuration: one typed dataclass, from YAML, overridden with key=value.

    unicap train-captioner --config train/configs/captioner_tiny.yaml run.steps=50 optim.lr=1e-3

Batch arithmetic: one sample is one image with all its turns (turns_per_image of its level x language
captions, all by default, packed in one row: train.captioner.data); global batch = data.micro_batch x
grad_accum x world size images. Set data.global_batch and grad_accum follows from the world size, so a run
resumed on another number of ranks sees the same samples in the same steps.

The DeepSpeed config is derived from this object (`deepspeed_config`); the optimizer is a torch AdamW built
by the trainer (no JIT-compiled fused optimizer on CPU). The resolved config is saved into the run folder,
every checkpoint and the exported model folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from train.config_base import TrainerConfig
from unicap import config as uconfig
from unicap.contract import caption as caption_record
from unicap.engines import MAX_PIXELS
from unicap.tiny_vlm import Qwen2VLArch


@dataclass
class ModelConfig:
    init: str = "tiny"  # a model folder, a hub id (e.g. Qwen/Qwen2-VL-2B-Instruct), or "tiny" (built from arch)
    arch: Qwen2VLArch = field(default_factory=Qwen2VLArch)  # sizes of the tiny model (init: tiny only)
    seed: int = 0  # the tiny model's initial weights
    freeze_vision: bool = False  # train the language model (and merger) only
    grounding: bool = False  # per-token grounding heads on the vision tower (synthetic data only)
    cell_layer: int = 0  # the LM layer whose image-token states the `cell` grounding head reads
    attn_implementation: str = "sdpa"
    export_dtype: str = "bfloat16"  # dtype of the exported weights (float32 for tiny models: exact greedy parity)


@dataclass
class DataConfig:
    source: str = "synth"  # synth: made on the fly from data.synth_seed | folder: data.captions + data.shards
    captions: str = ""  # folder source: caption Parquet folder (ok and partial rows; every caption present)
    shards: str = ""  # folder source: the image shards the captions were made from
    synth_seed: int = 1000  # synthetic source: images 0, 1, 2, ... of this seed (hold out another seed)
    canonical_order: bool = True  # synthetic source: groups named by (colour, shape, size), not drawing order
    single_group_until: int = 0  # synthetic source: curriculum, samples before this hold one group only
    max_pixels: int = MAX_PIXELS  # images fitted to this, as `unicap caption --max-pixels` does
    levels: tuple[str, ...] = caption_record.LEVELS
    languages: tuple[str, ...] = caption_record.LANGUAGES
    turns_per_image: int = 0  # caption turns per image and step (0: all of them)
    micro_batch: int = 8  # images per rank per forward
    global_batch: int | None = None  # if set: grad_accum = global_batch / (micro_batch x world)
    num_workers: int = 1  # DataLoader worker processes per rank


@dataclass
class OptimConfig:
    lr: float = 2e-5  # for a pretrained model; the tiny configs set their own
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 20
    schedule: str = "cosine"  # cosine (to min_lr_ratio x lr at run.steps) | constant
    min_lr_ratio: float = 0.05
    grad_accum: int = 1  # used when data.global_batch is unset
    grad_clip: float = 1.0
    ground_weight: float = 1.0  # weight of the grounding losses (model.grounding)
    ground_first_steps: int = 0  # the first steps train the vision tower on grounding alone (no LM)
    vision_lr_scale: float = 1.0  # the vision tower (and grounding heads) learn at lr x this


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 2
    precision: str = "auto"  # auto (bf16 on CUDA and bf16-native CPUs, else fp32) | bf16 | fp32


@dataclass
class RunConfig:
    out: str = "runs/captioner"  # the run folder: a local path or a URI, s3://bucket/runs/x (train.captioner.store)
    steps: int = 1000  # optimizer steps
    seed: int = 0
    save_every: int = 200  # steps between checkpoints (also on SIGTERM/SIGINT and at the end)
    keep_last: int = 2
    log_every: int = 10
    resume: str = "auto"  # auto (the run's latest checkpoint) | never | a checkpoint folder
    progress: bool = True
    threads: int = 0  # torch threads per rank (0: cores / ranks)
    # stop at the next step with a checkpoint, as on SIGTERM, once this file exists (none: no file is watched)
    stop_file: str | None = None
    term_grace_s: float = 20.0  # after SIGTERM, seconds to reach a step boundary before exiting (train.stop)
    # seconds a collective waits for its peers (unicap.distributed.set_timeout): init_timeout_s at start-up, around
    # checkpoints and the final export (full tensors gathered and written), collective_timeout_s after the first
    # step (torchtitan's 300 / 100). Past it the rank exits naming the rank that stopped answering.
    collective_timeout_s: float = 100.0
    init_timeout_s: float = 300.0
    max_minutes: float = 0.0  # a wall-clock cap on training (0: none): stop there, save and export what there is


@dataclass
class CaptionerConfig(TrainerConfig):
    ZERO_STAGES = (1, 2, 3)

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self):
        uconfig.check_one_of("data.source", self.data.source, ("synth", "folder"))
        if self.data.source == "folder" and not (self.data.captions and self.data.shards):
            raise ValueError("data.source folder needs data.captions (caption Parquet) and data.shards (its images)")
        if self.optim.ground_first_steps and not self.model.grounding:
            raise ValueError("optim.ground_first_steps needs model.grounding")
        if not 0 <= self.optim.ground_first_steps < self.run.steps:
            raise ValueError(f"optim.ground_first_steps {self.optim.ground_first_steps}: in [0, run.steps)")
        if self.model.grounding and self.data.source != "synth":
            raise ValueError("model.grounding needs the synthetic source (its scene graphs are the targets)")
        self.check_deepspeed()
        uconfig.check_one_of("model.export_dtype", self.model.export_dtype, ("bfloat16", "float16", "float32"))
        uconfig.check_one_of("optim.schedule", self.optim.schedule, ("cosine", "constant"))
        caption_record.caption_schema(self.data.levels, self.data.languages)  # usable names, else ValueError
        self.check_at_least_one("data.max_pixels")

    @property
    def run_dir(self) -> Path:
        return Path(self.run.out)


def load(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> CaptionerConfig:
    return uconfig.load(CaptionerConfig, path, overrides)


def deepspeed_config(cfg: CaptionerConfig, world_size: int, device: str | None = None) -> dict:
    """The DeepSpeed config, derived from the CaptionerConfig (never a second hand-kept file)."""
    zero = {"contiguous_gradients": True, "overlap_comm": False, "reduce_bucket_size": 50_000_000}
    return cfg.deepspeed_config_with(world_size, device, zero)
