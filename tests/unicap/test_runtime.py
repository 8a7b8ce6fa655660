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
