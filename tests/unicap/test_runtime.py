"""unicap.runtime's placement decisions for the caption job's engines (GPU clusters stand in as numbers)."""

import pytest

from unicap import engines, runtime
from unicap.engines import EngineConfig
from unicap.preflight import UsageError


def test_engines_claim_their_tensor_parallel_gpus_on_a_gpu_cluster_and_none_on_cpus():
    assert runtime.engine_gpus(8, 1, 8) == 1  # one engine per GPU
    assert runtime.engine_gpus(8, 2, 4) == 2  # 4 engines of 2 GPUs each
    assert runtime.engine_gpus(0, 1, 3) == 0  # a CPU cluster: engines on CPUs


def test_asking_for_more_gpus_than_the_cluster_has_is_refused_with_the_numbers():
    with pytest.raises(ValueError, match=r"4 engine\(s\) x 4 GPU\(s\) each need 16 GPUs; the cluster has 8"):
        runtime.engine_gpus(8, 4, 4)


def test_vllm_gets_tensor_parallel_on_gpus_and_refuses_it_on_cpus(monkeypatch):
    cfg = EngineConfig(tensor_parallel=2)
    with pytest.raises(UsageError, match="needs GPUs"):
        engines.vllm_engine_kwargs(cfg)
    monkeypatch.setattr(runtime, "has_cuda", lambda: True)  # stand-in: a CUDA machine (none here)
    kw = engines.vllm_engine_kwargs(cfg)
    assert kw["tensor_parallel_size"] == 2 and kw["distributed_executor_backend"] == "mp"
    assert "kv_cache_memory_bytes" not in kw and kw["gpu_memory_utilization"] == cfg.gpu_memory_utilization
    assert engines.vllm_engine_kwargs(EngineConfig())["tensor_parallel_size"] == 1


def test_tensor_parallel_below_one_is_a_usage_error():
    with pytest.raises(UsageError, match="--tensor-parallel must be a number >= 1"):
        EngineConfig(tensor_parallel=0)


def test_ray_jobs_take_their_device_from_the_cluster_not_the_driver(monkeypatch):
    monkeypatch.setattr(runtime, "cluster_gpus", lambda address=None: 4.0)  # stand-in: GPU workers, CPU head
    assert runtime.cluster_device("auto") == "cuda" and runtime.cluster_device("cuda") == "cuda"
    assert runtime.cluster_device("cpu") == "cpu"
    monkeypatch.setattr(runtime, "cluster_gpus", lambda address=None: 0.0)
    assert runtime.cluster_device("auto") == "cpu"
    with pytest.raises(ValueError, match="the Ray cluster has no GPUs"):
        runtime.cluster_device("cuda")
    with pytest.raises(ValueError, match="device 'cuda:1'"):
        runtime.cluster_device("cuda:1")


def cpu_flags() -> set[str]:
    for line in open("/proc/cpuinfo"):
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def test_bf16_hardware_probe_agrees_with_the_cpu_flags():
    """torch's probe against the kernel's own list: a CPU without avx512_bf16 / amx_bf16 emulates bf16 (~30x slower
    than fp32 on the AVX2 EPYC measured), so "auto" must not pick bf16 there."""
    flags = cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo flags on this machine")
    assert runtime.cpu_bf16_native() == bool({"avx512_bf16", "amx_bf16"} & flags), sorted(flags)


@pytest.mark.parametrize("native", [False, True])
def test_auto_precision_and_autocast_pick_bf16_only_where_it_runs_natively(monkeypatch, native):
    from train.captioner.config import CaptionerConfig
    from train.captioner.config import deepspeed_config as captioner_ds
    from train.config import TrainConfig, deepspeed_config

    monkeypatch.setattr(runtime, "cpu_bf16_native", lambda: native)
    cpu = "bf16" if native else "fp32"
    assert runtime.resolve_precision("auto", "cpu") == cpu
    assert runtime.resolve_precision("auto", "cuda:1") == "bf16"  # a GPU: always bf16
    assert runtime.resolve_precision("bf16", "cpu") == "bf16" and runtime.resolve_precision("fp32", "cuda") == "fp32"
    assert runtime.autocast_enabled("cpu") == native and runtime.autocast_enabled("cuda")
    assert not runtime.autocast_enabled("cuda", wanted=False)
    # both trainers' DeepSpeed configs follow the same decision (their default precision is auto)
    assert TrainConfig().deepspeed.precision == "auto" and CaptionerConfig().deepspeed.precision == "auto"
    assert deepspeed_config(TrainConfig(), 1, "cpu")["bf16"]["enabled"] == native
    assert deepspeed_config(TrainConfig(), 1, "cuda")["bf16"]["enabled"]
    assert captioner_ds(CaptionerConfig(), 1, "cpu")["bf16"]["enabled"] == native
    with pytest.raises(ValueError, match="precision 'fp16': one of"):
        runtime.resolve_precision("fp16", "cuda")


@pytest.mark.parametrize("native", [False, True])
def test_vllm_auto_dtype_is_float32_on_cpus_that_emulate_bf16(monkeypatch, native):
    """vLLM's own "auto" would run the float32 tiny captioner in bf16 on any x86 CPU (~30x slower where emulated)."""
    monkeypatch.setattr(runtime, "cpu_bf16_native", lambda: native)
    assert engines.vllm_engine_kwargs(EngineConfig())["dtype"] == ("auto" if native else "float32")
    assert engines.vllm_engine_kwargs(EngineConfig(dtype="bfloat16"))["dtype"] == "bfloat16"  # asked: honoured
    monkeypatch.setattr(runtime, "has_cuda", lambda: True)  # stand-in: a CUDA machine (none here)
    assert engines.vllm_engine_kwargs(EngineConfig())["dtype"] == "auto"
