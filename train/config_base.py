"""What both trainers' configs share (train.config for Next-DiT, train.captioner.config for the captioner).

Each trainer's config is a typed dataclass of sections (model, data, optim, deepspeed, run, ...), read from
YAML with `key=value` overrides by unicap.config; it subclasses `TrainerConfig` for the parts that are the
same in both: the batch arithmetic, the DeepSpeed checks and the DeepSpeed config derived from it.

Batch arithmetic: global batch = data.micro_batch x grad_accum x world size. With `data.global_batch` set,
grad_accum follows from the world size (a run resumed on another number of ranks keeps its global batch);
unset, `optim.grad_accum` is used.

Timeouts (unicap.distributed.set_timeout, as torchtitan's comm.init_timeout_seconds / train_timeout_seconds):
a collective waits at most run.init_timeout_s for its peers at start-up, around checkpoints and the final
export (full tensors are gathered and written), and run.collective_timeout_s once the first step is done; then
the rank exits naming the rank that stopped answering, and the launcher ends the job. Loader workers get
run.init_timeout_s per batch (a fetch that never returns is an error, not a hang).
"""

from __future__ import annotations

from typing import Any, ClassVar

from unicap import config as uconfig
from unicap import runtime

PRECISIONS = ("auto", "bf16", "fp32")  # auto: bf16 on CUDA and bf16-native CPUs, else fp32


class TrainerConfig:
    """A trainer config's shared methods; the subclass is a dataclass with data, optim, deepspeed and run sections
    (data.micro_batch, data.global_batch, optim.grad_accum, optim.grad_clip, deepspeed.zero_stage and .precision,
    run.steps, run.save_every, run.keep_last, run.collective_timeout_s, run.init_timeout_s)."""

    ZERO_STAGES: ClassVar[tuple[int, ...]] = (0, 1, 2, 3)  # the ZeRO stages this trainer runs under

    data: Any
    optim: Any
    deepspeed: Any
    run: Any

    def check_deepspeed(self) -> None:
        uconfig.check_one_of("deepspeed.zero_stage", self.deepspeed.zero_stage, self.ZERO_STAGES)
        uconfig.check_one_of("deepspeed.precision", self.deepspeed.precision, PRECISIONS)

    def check_at_least_one(self, *names: str) -> None:
        """data.micro_batch, run.steps, run.save_every, run.keep_last, optim.grad_accum, then `names`: each >= 1."""
        common = ("data.micro_batch", "run.steps", "run.save_every", "run.keep_last", "optim.grad_accum")
        uconfig.check_at_least(1, {name: self._get(name) for name in (*common, *names)})
        timeouts = ("run.collective_timeout_s", "run.init_timeout_s")
        uconfig.check_at_least(1, {name: self._get(name) for name in timeouts})

    def _get(self, dotted: str) -> Any:
        section, name = dotted.split(".")
        return getattr(getattr(self, section), name)

    def grad_accum(self, world_size: int) -> int:
        """Micro-batches per rank per optimizer step; refuses a global batch the ranks cannot split."""
        if self.data.global_batch is None:
            return self.optim.grad_accum
        per_step = self.data.micro_batch * world_size
        if self.data.global_batch % per_step:
            split = f"micro_batch {self.data.micro_batch} x world size {world_size} = {per_step}"
            raise ValueError(f"data.global_batch {self.data.global_batch} is not a multiple of {split}")
        return self.data.global_batch // per_step

    def global_batch(self, world_size: int) -> int:
        return self.data.micro_batch * self.grad_accum(world_size) * world_size

    def deepspeed_config_with(self, world_size: int, device: str | None, zero: dict, bf16: dict | None = None) -> dict:
        """The DeepSpeed config (never a second hand-kept file): this config's batch arithmetic, clipping and
        precision; `zero` is added to zero_optimization (after its stage), `bf16` to the bf16 section."""
        accum = self.grad_accum(world_size)
        bf16_enabled = runtime.resolve_precision(self.deepspeed.precision, device) == "bf16"
        return {
            "train_micro_batch_size_per_gpu": self.data.micro_batch,
            "gradient_accumulation_steps": accum,
            "train_batch_size": self.data.micro_batch * accum * world_size,
            "gradient_clipping": self.optim.grad_clip,
            "bf16": {"enabled": bf16_enabled, **(bf16 or {})},
            "zero_optimization": {"stage": self.deepspeed.zero_stage, **zero},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
