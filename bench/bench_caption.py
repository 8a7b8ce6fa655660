"""Captioning throughput: the whole job vs the bare vLLM engine vs a transformers generate() loop.

Same tiny model, same images, same prompts, same token budget, measured in one run (the machines
are noisy: only the ratios mean something). Also compares the two prompting strategies ("direct":
one request per level x language; "json": one structured request per image) on tokens and time.

    .venv/bin/python bench/bench_caption.py [--n 128] [--out bench/results/caption.json]

job        read shards -> decode -> engine -> validate -> write, through Ray Data (unicap caption)
bare       vllm.LLM.chat on pre-decoded, pre-resized images, batches of the job's batch size
hf         transformers Qwen2VLForConditionalGeneration.generate, greedy, same batches
ray_data_llm  ray.data.llm's vLLM processor over the same requests as rows (no validation/retry)
The job's images/s is given end to end and steady: rows after the first shard over the time
between the first and the last shard's write, so that the fixed start-up (Ray, engine actor,
~10-20 s on CPU) and the warm-up drop out, as they do for bare and hf. Run with the engine
actor's default compute threads (cores / actors) and with one thread (Ray's OMP_NUM_THREADS for
a fractional-CPU actor, which the job got until the runner set it).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._data import load_images  # noqa: E402
from bench._results import save  # noqa: E402

LEVELS, LANGS = ("long", "medium", "short", "tags"), ("en", "zh")
MAX_TOKENS = {"long": 32, "medium": 24, "short": 16, "tags": 16}
MAX_PIXELS = 224 * 224


def requests_for(images, strategy: str):
    from unicap import prompts
    from unicap.engines import GenRequest

    ps = prompts.prompts_for(strategy, LEVELS, LANGS, MAX_TOKENS)

    def request(p, im) -> GenRequest:
        return GenRequest(prompts.chat_messages(p, "x"), im, p.max_tokens, json_schema=p.json_schema)

    return [[request(p, im) for p in ps] for im in images]


def chat_text(proc, p) -> str:
    """Prompt P through the model's chat template, an image placeholder first: the legs that pass the image apart."""
    from unicap import prompts

    msgs = prompts.chat_messages(p, "x")
    msgs[1]["content"][0] = {"type": "image"}
    return proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)


def bench_bare(model: str, images, batch: int, strategy: str) -> dict:
    from unicap.engines import EngineConfig, VLLMEngine

    engine = VLLMEngine(EngineConfig(model=model, max_pixels=MAX_PIXELS))
    per_image = requests_for(images, strategy)
    engine.generate([r for reqs in per_image[:batch] for r in reqs])  # warm-up (not timed)
    t0, tokens = time.perf_counter(), 0
    for i in range(0, len(images), batch):
        res = engine.generate([r for reqs in per_image[i : i + batch] for r in reqs])
        tokens += sum(r.num_tokens for r in res)
    dt = time.perf_counter() - t0
    del engine
    n = len(images)
    return {"images_per_s": n / dt, "seconds": dt, "tokens_per_image": tokens / n, "seconds_per_image": dt / n}


def bench_hf(model: str, images, batch: int) -> dict:
    import torch
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    from unicap import prompts

    proc = AutoProcessor.from_pretrained(model, max_pixels=MAX_PIXELS)
    proc.tokenizer.padding_side = "left"
    net = Qwen2VLForConditionalGeneration.from_pretrained(model, dtype=torch.bfloat16).eval()
    ps = prompts.direct_prompts(LEVELS, LANGS, MAX_TOKENS)

    def run(imgs):
        n = 0
        for p in ps:
            inputs = proc(text=[chat_text(proc, p)] * len(imgs), images=imgs, return_tensors="pt", padding=True)
            with torch.inference_mode():
                out = net.generate(**inputs, max_new_tokens=p.max_tokens, do_sample=False)
            n += (out.shape[1] - inputs["input_ids"].shape[1]) * len(imgs)
        return n

    run(images[:batch])  # warm-up
    t0, tokens = time.perf_counter(), 0
    for i in range(0, len(images), batch):
        tokens += run(images[i : i + batch])
    dt = time.perf_counter() - t0
    return {"images_per_s": len(images) / dt, "seconds": dt, "tokens_per_image": tokens / len(images)}


def bench_ray_data_llm(model: str, images, batch: int) -> dict:
    """ray.data.llm's vLLM processor on the same requests: one row per request (the model's chat
    template applied here, the image as multimodal_data), fresh local Ray, the engine arguments of
    the job's engine. Steady state from the arrival times of output batches (first batch excluded)."""
    import numpy as np
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig
    from transformers import AutoProcessor

    from unicap import prompts
    from unicap.engines import EngineConfig, vllm_engine_kwargs
    from unicap.runtime import cpu_threads_per_actor, init_ray, threads_env

    proc = AutoProcessor.from_pretrained(model)
    ps = prompts.prompts_for("direct", LEVELS, LANGS, MAX_TOKENS)
    rows = []
    for n, im in enumerate(images):
        for p in ps:
            text = chat_text(proc, p)
            rows.append({"image_id": n, "prompt": text, "image": np.asarray(im), "max_tokens": p.max_tokens})
    init_ray(None)
    actor_env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_HOST_IP": "127.0.0.1"}
    actor_env |= threads_env(cpu_threads_per_actor(1))
    config = vLLMEngineProcessorConfig(
        model_source=model,
        engine_kwargs=vllm_engine_kwargs(EngineConfig(model=model, max_pixels=MAX_PIXELS)),
        batch_size=batch * len(ps),  # the job's batch: `batch` images x their requests
        concurrency=1,
        chat_template_stage=False,
        tokenize_stage=False,
        detokenize_stage=False,
        log_engine_metrics=False,  # its Prometheus logger imports ray.serve, which ray[data] lacks
        placement_group_config={"bundles": [{"CPU": 1}]},  # CPU vLLM (else it asks for a GPU)
        runtime_env={"env_vars": actor_env},
    )

    def preprocess(r: dict) -> dict:  # a row -> the processor's request: the image, greedy, the row's token budget
        sampling = {"max_tokens": int(r["max_tokens"]), "temperature": 0.0}
        image = {"image": r["image"]}
        return {"image_id": r["image_id"], "prompt": r["prompt"], "multimodal_data": image, "sampling_params": sampling}

    def postprocess(r: dict) -> dict:
        return {"image_id": r["image_id"], "tokens": r["num_generated_tokens"]}

    processor = build_processor(config, preprocess=preprocess, postprocess=postprocess)
    t0, arrivals, tokens = time.time(), [], 0
    for b in processor(ray.data.from_items(rows)).iter_batches(batch_size=None, batch_format="pandas"):
        arrivals.append((time.time(), len(b)))
        tokens += int(b["tokens"].sum())
    wall = time.time() - t0
    ray.shutdown()
    n_req = sum(k for _, k in arrivals)
    steady = (n_req - arrivals[0][1]) / (arrivals[-1][0] - arrivals[0][0]) / len(ps)
    return {
        "images_per_s_end_to_end": len(images) / wall,
        "images_per_s_steady": steady,
        "seconds": wall,
        "tokens_per_image": tokens / len(images),
        "output_batches": len(arrivals),
    }


def _run_job(model: str, shards: Path, batch: int, threads: int | None) -> dict:
    """One job on a fresh local Ray; steady-state images/s from the times its shards were written."""
    import ray

    from pipelines.caption import run_job
    from unicap.captioner import CaptionConfig
    from unicap.engines import EngineConfig

    out = Path(tempfile.mkdtemp(prefix="bench-captions-"))
    engine = EngineConfig(model=model, max_pixels=MAX_PIXELS)
    cfg = CaptionConfig(levels=LEVELS, languages=LANGS, max_retries=0, max_pixels=MAX_PIXELS, max_tokens=MAX_TOKENS)
    t0 = time.time()
    summary = run_job(shards, out, engine, cfg, batch_size=batch, threads_per_actor=threads)
    wall = time.time() - t0
    ray.shutdown()  # each run pays the same start-up: a fresh local Ray and a fresh engine actor
    files = sorted(out.glob("*.parquet"), key=lambda p: p.stat().st_mtime)
    first, last = files[0].stat().st_mtime, files[-1].stat().st_mtime
    after_first = summary["rows"] - pq.read_metadata(files[0]).num_rows
    return {
        "images_per_s_end_to_end": summary["rows"] / wall,
        "seconds": wall,
        "images_per_s_steady": after_first / (last - first),  # first shard (start-up, warm-up) excluded
        "tokens_per_image": summary["output_tokens"] / summary["rows"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--out", default="bench/results/caption.json")
    ap.add_argument("--only", default=None, help="run one leg (job, ray_data_llm, bare, hf) and print it")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from datagen.synth import synth
    from unicap.tiny_vlm import tiny_qwen2vl

    model = str(tiny_qwen2vl())
    shards = Path(tempfile.mkdtemp(prefix="bench-shards-"))
    synth(str(shards), args.n, seed=1, shard_size=args.batch)
    images = load_images(shards, MAX_PIXELS)
    legs = {
        "job": lambda: _run_job(model, shards, args.batch, None),
        "ray_data_llm": lambda: bench_ray_data_llm(model, images, args.batch),
        "bare": lambda: bench_bare(model, images, args.batch, "direct"),
        "hf": lambda: bench_hf(model, images, args.batch),
    }
    if args.only:
        print(legs[args.only]())
        return 0
    res = {"n_images": args.n, "batch": args.batch, "max_tokens": MAX_TOKENS, "max_pixels": MAX_PIXELS}
    res["job"] = _run_job(model, shards, args.batch, None)
    res["job_1_thread"] = _run_job(model, shards, args.batch, 1)  # what Ray gave the actor before the fix
    res["ray_data_llm"] = bench_ray_data_llm(model, images, args.batch)
    res["bare_direct"] = bench_bare(model, images, args.batch, "direct")
    res["bare_json"] = bench_bare(model, images, args.batch, "json")
    res["hf_generate"] = bench_hf(model, images, args.batch)
    bare, hf = res["bare_direct"]["images_per_s"], res["hf_generate"]["images_per_s"]
    job, ray_data_llm = res["job"]["images_per_s_steady"], res["ray_data_llm"]["images_per_s_steady"]
    res["ratio_job_steady_vs_bare"] = job / bare
    res["ratio_job_1_thread_steady_vs_bare"] = res["job_1_thread"]["images_per_s_steady"] / bare
    res["ratio_ray_data_llm_steady_vs_bare"] = ray_data_llm / bare
    res["ratio_job_steady_vs_ray_data_llm"] = job / ray_data_llm
    res["ratio_job_end_to_end_vs_bare"] = res["job"]["images_per_s_end_to_end"] / bare
    res["ratio_job_steady_vs_hf"] = job / hf
    res["ratio_bare_vs_hf"] = bare / hf
    res["ratio_json_vs_direct_time"] = res["bare_json"]["seconds"] / res["bare_direct"]["seconds"]
    save(res, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
