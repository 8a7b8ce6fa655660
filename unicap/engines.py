"""Caption engines: vLLM in-process (default) or an OpenAI-compatible vLLM server over HTTP.

Both take the same chat messages and sampling settings and return the same GenResult, so the
captioner above them is engine-agnostic and both modes give the same captions (greedy decoding,
the same pixels: the offline engine gets the PIL image, the server the same image as lossless PNG).

Model names: "tiny" builds (once, cached) the tiny random Qwen2-VL of unicap.tiny_vlm;
anything else is a local folder or a Hugging Face id, e.g. Qwen/Qwen2.5-VL-7B-Instruct.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from PIL import Image

from unicap import preflight, runtime

# The VLM's image budget in pixels: the captioner fits every image into it and vLLM's processor is
# given the same number, so the two never disagree. The one default; jobs and configs refer to it.
MAX_PIXELS = 448 * 448


@dataclass
class EngineConfig:
    model: str = "tiny"
    server: str | None = None  # base URL of an OpenAI-compatible server, e.g. http://127.0.0.1:8000
    max_pixels: int = MAX_PIXELS
    max_model_len: int = 4096
    dtype: str = "auto"
    kv_cache_bytes: int | None = None  # CPU: bounded KV cache (defaults to 256 MiB); GPU: use gpu_memory_utilization
    gpu_memory_utilization: float = 0.85
    tensor_parallel: int = 1  # GPUs per engine (vLLM tensor_parallel_size); each engine actor claims that many
    enforce_eager: bool | None = None  # default: True on CPU (no graph capture there)
    timeout_s: float = 180.0  # deadline of one HTTP request, answer fully read (server mode; per attempt)
    max_concurrent: int = 32  # in-flight HTTP requests per actor (server mode)
    http_retries: int = 3  # transport retries with exponential backoff (server mode)
    max_answer_bytes: int = 4 << 20  # a larger server answer is malformed_output, not read on (server mode)
    extra: dict = field(default_factory=dict)  # passed to vllm.LLM as is
    # added to every request's sampling settings as is (vllm.SamplingParams; the server's request body),
    # e.g. {"ignore_eos": True} for benchmarks that need fixed output lengths
    sampling_extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        preflight.above("max_pixels", self.max_pixels, 0)
        preflight.above("max_model_len", self.max_model_len, 0)
        preflight.above("kv_cache_bytes", self.kv_cache_bytes, 0, optional=True)
        preflight.above("timeout", self.timeout_s, 0)
        preflight.at_least("max_concurrent_requests", self.max_concurrent, 1)
        preflight.at_least("http_retries", self.http_retries, 0)
        preflight.at_least("tensor_parallel", self.tensor_parallel, 1)
        preflight.above("max_answer_bytes", self.max_answer_bytes, 0)
        if not 0 < self.gpu_memory_utilization <= 1:
            raise preflight.UsageError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.server is not None:
            try:
                parts = urlsplit(self.server)
                ok = parts.scheme in ("http", "https") and bool(parts.hostname) and (parts.port or 1) > 0
            except ValueError:
                ok = False
            if not ok:
                raise preflight.UsageError(
                    f"--server must be an http(s) URL such as http://127.0.0.1:8000, got {self.server!r}"
                )


@dataclass
class GenRequest:
    messages: list[dict]  # chat messages; the image part's url is replaced per engine
    image: Image.Image | None
    max_tokens: int
    temperature: float = 0.0
    json_schema: dict | None = None


@dataclass
class GenResult:
    text: str | None
    finish_reason: str | None
    num_tokens: int = 0
    error: str | None = None  # "<reason>: <detail>" when the engine failed (timeout, engine_error)


def resolve_model(name: str) -> str:
    if name == "tiny":
        from unicap.tiny_vlm import tiny_qwen2vl

        return str(tiny_qwen2vl())
    p = Path(name).expanduser()
    return str(p.resolve()) if p.exists() else name


def png_data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _with_image(messages: list[dict], part: dict) -> list[dict]:
    """Copy of `messages` with the image_url placeholder part replaced by `part`."""
    out = []
    for m in messages:
        if isinstance(m.get("content"), list):
            m = {**m, "content": [part if c.get("type") == "image_url" else c for c in m["content"]]}
        out.append(m)
    return out


def _engine_dtype(dtype: str, gpu: bool) -> str:
    """vLLM's dtype on this machine. vLLM's "auto" runs a float32 checkpoint in bf16 on every x86 CPU, and where
    the CPU emulates bf16 (no AVX512-BF16 / AMX: runtime.cpu_bf16_native) that is ~30x slower than float32, so
    "auto" there means float32. An explicit dtype, and "auto" on GPUs or bf16-native CPUs, pass through."""
    if dtype == "auto" and not gpu and not runtime.cpu_bf16_native():
        return "float32"
    return dtype


def vllm_engine_kwargs(cfg: EngineConfig) -> dict:
    """vLLM engine arguments (everything but the model) for this machine: one place for the job's
    engine and for benchmarks that build engines another way (ray.data.llm)."""
    gpu = runtime.has_cuda()
    kwargs = dict(
        max_model_len=cfg.max_model_len,
        dtype=_engine_dtype(cfg.dtype, gpu),
        enforce_eager=(not gpu) if cfg.enforce_eager is None else cfg.enforce_eager,
        limit_mm_per_prompt={"image": 1, "video": 0},
        mm_processor_kwargs={"max_pixels": cfg.max_pixels},
        enable_prefix_caching=True,
        seed=0,
    )
    if gpu:
        kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        kwargs["tensor_parallel_size"] = cfg.tensor_parallel
        if cfg.tensor_parallel > 1:  # the engine's workers on the GPUs Ray gave this actor
            kwargs["distributed_executor_backend"] = "mp"
    elif cfg.tensor_parallel > 1:
        raise preflight.UsageError(f"--tensor-parallel {cfg.tensor_parallel} needs GPUs; this machine has none")
    else:
        kwargs["kv_cache_memory_bytes"] = cfg.kv_cache_bytes or (256 << 20)
    return {**kwargs, **cfg.extra}


class VLLMEngine:
    """vllm.LLM in this process (inside a Ray Data actor in the caption job)."""

    name = "vllm"

    def __init__(self, cfg: EngineConfig):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine: 2 s start on CPU
        os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        from vllm import LLM

        self.llm = LLM(model=resolve_model(cfg.model), **vllm_engine_kwargs(cfg))
        self.model_name = cfg.model
        self.sampling_extra = dict(cfg.sampling_extra)

    def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        if not requests:
            return []
        convs, params = [], []
        for r in requests:
            part = {"type": "image_pil", "image_pil": r.image} if r.image is not None else None
            convs.append(_with_image(r.messages, part) if part else r.messages)
            params.append(
                SamplingParams(
                    max_tokens=r.max_tokens,
                    temperature=r.temperature,
                    structured_outputs=StructuredOutputsParams(json=r.json_schema) if r.json_schema else None,
                    **self.sampling_extra,
                )
            )
        try:
            outs = self.llm.chat(convs, params, use_tqdm=False)
        except Exception as e:  # noqa: BLE001 - one bad batch must not kill the actor
            return [GenResult(None, None, 0, f"engine_error: {type(e).__name__}: {e}"[:500]) for _ in requests]
        if len(outs) != len(requests):
            return [
                GenResult(None, None, 0, f"engine_error: {len(outs)} outputs for {len(requests)} requests")
                for _ in requests
            ]
        results = []
        for o in outs:
            c = o.outputs[0]
            results.append(GenResult(c.text, c.finish_reason, len(c.token_ids)))
        return results


MAX_TOKENS_COUNT = 2**31 - 1  # the record's num_output_tokens is int32


def parse_chat_answer(raw: bytes) -> GenResult:
    """An OpenAI chat-completion answer -> GenResult; anything that is not one is malformed_output."""

    def malformed(why: str) -> GenResult:
        return GenResult(None, None, 0, f"malformed_output: server answer {why}")

    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as e:
        return malformed(f"is not JSON ({type(e).__name__})")
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return malformed("has no choices")
    message = choices[0].get("message")
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, str):
        return malformed(f"content is {type(content).__name__}, not text")
    try:
        content.encode("utf-8")
    except UnicodeEncodeError:
        return malformed("content is not valid Unicode text (lone surrogates)")
    finish = choices[0].get("finish_reason")
    usage = data.get("usage")
    tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
    tokens = tokens if isinstance(tokens, int) and not isinstance(tokens, bool) else 0
    return GenResult(content, finish if isinstance(finish, str) else None, max(0, min(tokens, MAX_TOKENS_COUNT)))


class ServerEngine:
    """Calls an OpenAI-compatible server (`python -m vllm.entrypoints.openai.api_server`).

    Bounded concurrency (a semaphore of `max_concurrent` requests); a deadline of `timeout_s` for each
    attempt as a whole, from connecting to the last byte of the answer (a server that trickles bytes
    is cut off, not waited on); answers over `max_answer_bytes` are not read on; retries with
    exponential backoff and jitter on transport errors, timeouts and 429/5xx answers. Every failure
    is that request's GenResult error, never an exception.
    """

    name = "vllm-server"

    def __init__(self, cfg: EngineConfig):
        import httpx

        self.cfg = cfg
        self.base = cfg.server.rstrip("/")
        if not self.base.endswith("/v1"):
            self.base += "/v1"
        self.model_name = cfg.model
        self._httpx = httpx
        self._served = None

    async def _read(self, client, method: str, url: str, **kw) -> tuple[int, bytes]:
        """(status, body) of one request; the body is read up to max_answer_bytes + 1 bytes."""
        async with client.stream(method, url, timeout=self.cfg.timeout_s, **kw) as resp:
            chunks, size = [], 0
            async for chunk in resp.aiter_bytes():
                chunks.append(chunk)
                size += len(chunk)
                if size > self.cfg.max_answer_bytes:
                    break
            return resp.status_code, b"".join(chunks)

    async def _served_model(self, client) -> str:
        """The server's model id: the one asked for if served, else the only one it serves."""
        if self._served is None:
            status, raw = await asyncio.wait_for(self._read(client, "GET", f"{self.base}/models"), self.cfg.timeout_s)
            if status != 200:
                raise RuntimeError(f"GET /v1/models answered HTTP {status}")
            try:
                ids = [m["id"] for m in json.loads(raw)["data"] if isinstance(m["id"], str)]
            except (ValueError, KeyError, TypeError, RecursionError) as e:
                raise RuntimeError(f"GET /v1/models answer unreadable ({type(e).__name__})") from None
            if not ids:
                raise RuntimeError("the server serves no model")
            want = resolve_model(self.cfg.model) if self.cfg.model == "tiny" else self.cfg.model
            self._served = want if want in ids else ids[0]
        return self._served

    async def _one(self, client, sem, r: GenRequest, model: str) -> GenResult:
        part = {"type": "image_url", "image_url": {"url": png_data_url(r.image)}} if r.image is not None else None
        body = {
            "model": model,
            "messages": _with_image(r.messages, part) if part else r.messages,
            "max_tokens": r.max_tokens,
            "temperature": r.temperature,
            **self.cfg.sampling_extra,
        }
        if r.json_schema:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "captions", "schema": r.json_schema},
            }
        url = f"{self.base}/chat/completions"
        last = "engine_error: no attempt made"
        for attempt in range(self.cfg.http_retries + 1):
            if attempt:
                await asyncio.sleep(min(0.5 * 2**attempt, 10) * (0.5 + random.random()))
            async with sem:
                try:
                    status, raw = await asyncio.wait_for(self._read(client, "POST", url, json=body), self.cfg.timeout_s)
                except (TimeoutError, self._httpx.TimeoutException):
                    last = f"timeout: no complete answer within {self.cfg.timeout_s:g}s"
                    continue
                except self._httpx.HTTPError as e:
                    last = f"engine_error: {type(e).__name__}: {e}"[:300]
                    continue
            if len(raw) > self.cfg.max_answer_bytes:
                return GenResult(
                    None, None, 0, f"malformed_output: server answer over {self.cfg.max_answer_bytes} bytes"
                )
            if status == 429 or status >= 500:
                last = f"engine_error: HTTP {status}: {raw[:200].decode('utf-8', 'replace')}"
                continue
            if status != 200:
                return GenResult(None, None, 0, f"engine_error: HTTP {status}: {raw[:200].decode('utf-8', 'replace')}")
            return parse_chat_answer(raw)
        return GenResult(None, None, 0, last)

    def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        if not requests:
            return []

        async def run() -> list:
            sem = asyncio.Semaphore(self.cfg.max_concurrent)
            limits = self._httpx.Limits(max_connections=self.cfg.max_concurrent)
            async with self._httpx.AsyncClient(limits=limits) as client:
                try:
                    model = await self._served_model(client)
                except Exception as e:  # noqa: BLE001 - unreachable server: every request records it
                    why = "no answer within the timeout" if isinstance(e, TimeoutError) else f"{type(e).__name__}: {e}"
                    return [GenResult(None, None, 0, f"engine_error: server unreachable: {why}"[:300])] * len(requests)
                return await asyncio.gather(
                    *(self._one(client, sem, r, model) for r in requests), return_exceptions=True
                )

        try:
            results = asyncio.run(run())
        except Exception as e:  # noqa: BLE001 - the batch's requests record it; the actor lives on
            results = [e] * len(requests)
        return [
            GenResult(None, None, 0, f"engine_error: {type(r).__name__}: {r}"[:300])
            if isinstance(r, BaseException)
            else r
            for r in results
        ]


def make_engine(cfg: EngineConfig):
    return ServerEngine(cfg) if cfg.server else VLLMEngine(cfg)


def wait_for_server(url: str, timeout_s: float = 120.0) -> None:
    """Block until an OpenAI-compatible server answers /v1/models (used by tests and the demo)."""
    import httpx

    deadline = time.time() + timeout_s
    base = url.rstrip("/")
    while time.time() < deadline:
        try:
            if httpx.get(f"{base}/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"no OpenAI-compatible server at {url} after {timeout_s:.0f}s")
