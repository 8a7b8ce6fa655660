"""Full and local views of DeepSpeed ZeRO state, per parameter: the one place that knows ZeRO's layout.

Under ZeRO-1/2 every rank holds the whole low-precision model and a fragment of each parameter's fp32
master copy and optimizer moments (`param._hp_mapping`); under ZeRO-3 a rank holds a partition of
everything (`param.ds_id`). DeepSpeed's `safe_get_full_*` / `safe_set_full_*` assemble and scatter full
tensors (collectives: every rank must call them, in the same order). deepspeed is imported only when used,
so reading weights (`unicap sample`) does not load it. With them a checkpoint is a set of
full tensors per parameter name: it resumes on any number of ranks and any ZeRO stage.
"""

from __future__ import annotations

import torch

OPTIMIZER_KEYS = ("exp_avg", "exp_avg_sq")  # torch AdamW's moments


def check_supported(engine) -> None:
    if engine.zero_optimization_stage() not in (1, 2, 3):
        raise ValueError("the trainer's checkpoints need ZeRO stage 1, 2 or 3 (deepspeed.zero_stage)")


def trainable(module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def full_master(param: torch.nn.Parameter) -> torch.Tensor:
    """The full fp32 master tensor of a parameter, on CPU (collective)."""
    from deepspeed.utils import safe_get_full_fp32_param

    t = safe_get_full_fp32_param(param)
    if t is None:
        raise RuntimeError("parameter has no fp32 master copy: is the engine running ZeRO?")
    return t.detach().float().cpu()


def set_full_master(param: torch.nn.Parameter, value: torch.Tensor) -> None:
    """Overwrite the fp32 master (this rank's part of it) from a full tensor. The low-precision weights
    follow at the next optimizer step; load them into the module before deepspeed.initialize too."""
    from deepspeed.utils import safe_set_full_fp32_param

    safe_set_full_fp32_param(param, value.to(torch.float32))


def full_optimizer_state(param: torch.nn.Parameter, key: str) -> torch.Tensor:
    from deepspeed.utils import safe_get_full_optimizer_state

    return safe_get_full_optimizer_state(param, key).detach().float().cpu()


def set_full_optimizer_state(param: torch.nn.Parameter, value: torch.Tensor, key: str) -> None:
    from deepspeed.utils import safe_set_full_optimizer_state

    safe_set_full_optimizer_state(param, value.to(torch.float32), key)


def inner_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer ZeRO drives (its state is keyed by this rank's flat fp32 partitions)."""
    return engine.optimizer.optimizer


def ensure_optimizer_state(engine) -> None:
    """Create AdamW's state (zeros, step 0) before the first step, so that it can be overwritten with a
    checkpoint's moments; torch creates it lazily at the first step otherwise."""
    opt = inner_optimizer(engine)
    for group in opt.param_groups:
        for p in group["params"]:
            if not opt.state.get(p):
                opt.state[p] = {
                    "step": torch.tensor(0.0, device="cpu"),
                    "exp_avg": torch.zeros_like(p),
                    "exp_avg_sq": torch.zeros_like(p),
                }
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:  # ZeRO-1/2 link the per-parameter fragments to the state after the first step
        link()


def optimizer_step_count(engine) -> int:
    opt = inner_optimizer(engine)
    for state in opt.state.values():
        if "step" in state:
            return int(state["step"])
    return 0


def set_optimizer_step_count(engine, step: int) -> None:
    opt = inner_optimizer(engine)
    for state in opt.state.values():
        state["step"] = torch.tensor(float(step), device="cpu")  # where torch AdamW (not fused) keeps it


def local_master(param: torch.nn.Parameter) -> torch.Tensor:
    """This rank's part of the fp32 master (a view): the ZeRO-3 partition or the ZeRO-1/2 fragment."""
    if hasattr(param, "ds_id"):
        return param._z3_optimizer.get_local_fp32_param(param)
    mapping = getattr(param, "_hp_mapping", None)
    return mapping.hp_fragment if mapping is not None else torch.empty(0, device=param.device)


def set_local_master(param: torch.nn.Parameter, value: torch.Tensor) -> None:
    if hasattr(param, "ds_id"):
        param._z3_optimizer.set_local_hp_param(value, param)
    elif getattr(param, "_hp_mapping", None) is not None:
        param._hp_mapping.hp_fragment.data.copy_(value)
