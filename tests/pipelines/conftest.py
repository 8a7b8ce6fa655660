"""Fixtures of the job tests: the tiny VLM (built once per cache), synthetic shards, a real vLLM server."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import free_port

TINY_MAX_TOKENS = {"long": 24, "medium": 16, "short": 12, "tags": 12}  # the random model never stops
TINY_MAX_TOKENS_ARG = ",".join(f"{k}={v}" for k, v in TINY_MAX_TOKENS.items())  # as --max-tokens takes them


@pytest.fixture(scope="session")
def tiny_vlm() -> Path:
    from unicap.tiny_vlm import tiny_qwen2vl

    return tiny_qwen2vl()


@pytest.fixture(scope="module")
def synth_shards(tmp_path_factory) -> Path:
    from datagen.synth import synth

    out = tmp_path_factory.mktemp("synth")
    synth(str(out), 24, seed=5, shard_size=4)
    return out


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant (an embedded Ray's gcs, raylet and workers)."""
    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    kill_all([root, *root.children(recursive=True)])


def kill_all(procs: list) -> None:
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=20)


@pytest.fixture(scope="module")
def vllm_server(tiny_vlm):
    """A real OpenAI-compatible vLLM server on 127.0.0.1 serving the tiny Qwen2-VL."""
    from unicap.engines import EngineConfig, vllm_engine_kwargs, wait_for_server

    port = free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_HOST_IP": "127.0.0.1", "VLLM_LOGGING_LEVEL": "WARNING"}
    dtype = vllm_engine_kwargs(EngineConfig())["dtype"]  # the offline engine's: float32 where bf16 is emulated
    serve = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_vlm)]
    where = ["--host", "127.0.0.1", "--port", str(port)]
    sizes = ["--enforce-eager", "--max-model-len", "4096", "--limit-mm-per-prompt", '{"image": 1, "video": 0}']
    cmd = [*serve, *where, *sizes, "--mm-processor-kwargs", '{"max_pixels": 200704}', "--dtype", dtype]
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"vllm-server-{port}.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        t0 = time.time()
        wait_for_server(f"http://127.0.0.1:{port}", timeout_s=240)
        print(f"vLLM server up in {time.time() - t0:.1f}s")
        yield f"http://127.0.0.1:{port}"
    finally:
        kill_tree(proc.pid)
        log.close()
