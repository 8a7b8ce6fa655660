"""EMA of the fp32 master weights, sharded exactly as ZeRO shards the master (ZeRO-2 and ZeRO-3 alike).

Each rank keeps the EMA of its own part of the master (train.zero.local_master): no communication per
step and 1/world of the memory of a full fp32 copy. Full tensors are assembled only to save or sample,
by swapping the EMA into the master and reading it back through DeepSpeed's own gather.

    ema = ShardedEMA(engine.module, decay=0.9999)
    ... engine.step(); ema.update(step)
    weights = ema.full_state()          # collective; {name: fp32 CPU tensor}
"""

from __future__ import annotations

import torch

from train import zero


def ema_decay(decay: float, step: int) -> float:
    """The configured decay, warmed up as (1 + step) / (10 + step) so that early EMA is not the init."""
    return min(decay, (1 + step) / (10 + step))


class ShardedEMA:
    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.params = zero.trainable(module)
        self.shadow = [zero.local_master(p).detach().float().clone() for _, p in self.params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = ema_decay(self.decay, step)
        pairs = [(s, zero.local_master(p)) for s, (_, p) in zip(self.shadow, self.params, strict=True) if s.numel()]
        if pairs:  # one fused kernel per dtype and device, not one lerp per parameter
            shadows, masters = zip(*pairs, strict=True)
            torch._foreach_lerp_(list(shadows), [m.float() for m in masters], 1.0 - d)

    @torch.no_grad()
    def full_state(self) -> dict[str, torch.Tensor]:
        """{name: full fp32 EMA tensor on CPU} (collective: every rank calls, every rank gets it)."""
        out = {}
        for shadow, (name, p) in zip(self.shadow, self.params, strict=True):
            master = zero.local_master(p).detach().clone()
            zero.set_local_master(p, shadow)
            out[name] = zero.full_master(p)
            zero.set_local_master(p, master)
        return out

    @torch.no_grad()
    def load_full_state(self, state: dict[str, torch.Tensor]) -> None:
        """Set the EMA from full tensors (collective); the master is left as it was."""
        for i, (name, p) in enumerate(self.params):
            if name not in state:
                raise KeyError(f"EMA state has no tensor for parameter {name}")
            master = zero.full_master(p)
            zero.set_full_master(p, state[name])
            self.shadow[i] = zero.local_master(p).detach().float().clone()
            zero.set_full_master(p, master)
