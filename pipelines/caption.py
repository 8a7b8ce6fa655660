"""The UniCap captioning job: image shards -> caption-record Parquet, one file per shard.

    unicap caption --input data/shards --output data/captions --model tiny
    python -m pipelines.caption --input ... --output ... --model Qwen/Qwen2.5-VL-7B-Instruct
    ray job submit --working-dir . -- python -m pipelines.caption --input ... --output ...

Ray Data reads the shards (datagen.shards.read_shards), an actor pool runs the captioner
(vLLM in each actor, or `--server URL` to call an OpenAI-compatible vLLM server), and the driver
writes each shard's Parquet the moment it is complete (pipelines.sink). Re-running skips complete
shards: a job killed at any moment loses nothing and writes nothing twice.
Outputs: OUTPUT/{shard}.parquet, OUTPUT/_stats/{shard}.json, OUTPUT/_summary.json.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)

from pipelines.runner import ShardJob, run_sharded, summarise
from unicap import schema
from unicap.captioner import CaptionConfig, Captioner
from unicap.engines import EngineConfig, has_cuda, make_engine
from unicap.prompts import PROMPT_VERSION

ITEM_FIELDS = ("key", "shard", "image", "source", "original_caption", "sha256")


class CaptionStage:
    """Ray Data actor: one engine per actor, loaded once; batches of shard rows -> caption rows."""

    def __init__(self, engine_cfg: dict, caption_cfg: dict):
        self.captioner = Captioner(make_engine(EngineConfig(**engine_cfg)), CaptionConfig(**caption_cfg))

    def __call__(self, batch: pa.Table) -> pa.Table:
        items = batch.select([f for f in ITEM_FIELDS if f in batch.column_names]).to_pylist()
        cfg = self.captioner.cfg
        return schema.to_table(self.captioner.caption(items), cfg.levels, cfg.languages)


def failure_rows(failures: list[dict], cfg: CaptionConfig, model: str, engine: str) -> pa.Table:
    rows = [{**f, "status": "failed", "model": model, "prompt_version": PROMPT_VERSION, "engine": engine,
             "num_output_tokens": 0, "created_at": schema.utcnow()} for f in failures]  # fmt: skip
    return schema.to_table(rows, cfg.levels, cfg.languages)


def shard_stats(table: pa.Table) -> dict:
    statuses = Counter(table.column("status").to_pylist())
    reasons = Counter(schema.error_reason(e) for e in table.column("error").to_pylist() if e)
    return {
        "rows": table.num_rows,
        "status": dict(statuses),
        "failures_by_reason": dict(reasons),
        "output_tokens": int(sum(t or 0 for t in table.column("num_output_tokens").to_pylist())),
    }


def run_job(
    input_dir: str | Path,
    output: str | Path,
    engine_cfg: EngineConfig,
    caption_cfg: CaptionConfig,
    *,
    batch_size: int = 16,
    concurrency: int = 1,
    cpus_per_actor: float | None = None,
    threads_per_actor: int | None = None,
    address: str | None = None,
    limit_shards: int | None = None,
) -> dict:
    gpu = has_cuda() and not engine_cfg.server
    engine_name = "vllm-server" if engine_cfg.server else "vllm"
    job = ShardJob(
        name="caption",
        stage_cls=CaptionStage,
        stage_kwargs={"engine_cfg": asdict(engine_cfg), "caption_cfg": asdict(caption_cfg)},
        schema=schema.caption_schema(caption_cfg.levels, caption_cfg.languages),
        stats_fn=shard_stats,
        failure_table=lambda f: failure_rows(f, caption_cfg, engine_cfg.model, engine_name),
        num_gpus=1 if gpu else 0,
        num_cpus=cpus_per_actor if cpus_per_actor is not None else (1 if gpu else 0.5),
        env_vars={"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_HOST_IP": "127.0.0.1"},
        threads=threads_per_actor,
    )
    tokens = 0

    def count_tokens(batch: pa.Table) -> None:
        nonlocal tokens
        tokens += int(pa.compute.sum(batch.column("num_output_tokens")).as_py() or 0)

    run = run_sharded(job, input_dir, output, batch_size=batch_size, concurrency=concurrency, address=address,
                      limit_shards=limit_shards, on_batch=count_tokens)  # fmt: skip
    run.update(
        tokens_per_s=round(tokens / run["seconds"], 2) if run["seconds"] and tokens else 0.0,
        engine="server " + engine_cfg.server if engine_cfg.server else "vllm",
        model=engine_cfg.model,
        strategy=caption_cfg.strategy,
    )
    return summarise(Path(output), run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, help="folder of image shards (ingest / ingest-folder / synth)")
    p.add_argument("--output", required=True, help="folder for the caption Parquet files")
    p.add_argument("--model", default="tiny", help="HF id, local folder, or 'tiny' (offline random Qwen2-VL)")
    p.add_argument("--server", default=None, help="base URL of an OpenAI-compatible vLLM server (server mode)")
    p.add_argument("--levels", default=",".join(schema.LEVELS), help="caption levels (default long,medium,short,tags)")
    p.add_argument("--languages", default=",".join(schema.LANGUAGES), help="languages (default en,zh)")
    p.add_argument("--strategy", default="direct", choices=["direct", "json"], help="prompting strategy")
    p.add_argument("--max-pixels", type=int, default=448 * 448, help="images are downscaled to this many pixels")
    p.add_argument("--max-tokens", default="", help="per-level token limits, e.g. long=384,tags=96")
    p.add_argument("--batch-size", type=int, default=16, help="images per actor call (default 16)")
    p.add_argument("--concurrency", type=int, default=1, help="engine actors (default 1; one per GPU)")
    p.add_argument("--cpus-per-actor", type=float, default=None, help="Ray CPUs claimed per actor")
    p.add_argument("--threads-per-actor", type=int, default=None, help="compute threads per CPU actor (default: cores / actors)")
    p.add_argument("--max-retries", type=int, default=2, help="retries of a failed caption (default 2)")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds per server request (server mode)")
    p.add_argument("--max-concurrent-requests", type=int, default=32, help="in-flight requests per actor (server)")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or a local instance)")
    p.add_argument("--limit-shards", type=int, default=None, help="caption at most this many pending shards")


def configs_from_args(args: argparse.Namespace) -> tuple[EngineConfig, CaptionConfig]:
    max_tokens = {k: int(v) for k, v in (kv.split("=") for kv in args.max_tokens.split(",") if kv)}
    engine = EngineConfig(model=args.model, server=args.server, max_pixels=args.max_pixels,
                          timeout_s=args.timeout, max_concurrent=args.max_concurrent_requests)  # fmt: skip
    caption = CaptionConfig(
        levels=tuple(args.levels.split(",")),
        languages=tuple(args.languages.split(",")),
        strategy=args.strategy,
        max_retries=args.max_retries,
        max_pixels=args.max_pixels,
        max_tokens=max_tokens,
    )
    schema.caption_schema(caption.levels, caption.languages)  # fail early on bad names
    return engine, caption


def run(args: argparse.Namespace) -> int:
    engine, caption = configs_from_args(args)
    s = run_job(args.input, args.output, engine, caption, batch_size=args.batch_size, concurrency=args.concurrency,
                cpus_per_actor=args.cpus_per_actor, threads_per_actor=args.threads_per_actor, address=args.address, limit_shards=args.limit_shards)  # fmt: skip
    r = s["last_run"]
    print(f"caption: {r['images']} images in {r['seconds']}s ({r['images_per_s']} images/s, "
          f"{r['tokens_per_s']} tokens/s); output holds {s['rows']} rows in {s['shards']} shards")  # fmt: skip
    print(f"  status: {s['status']}  failures by reason: {s['failures_by_reason']}")
    print(f"  open with: pandas.read_parquet({str(args.output)!r})   summary: {Path(args.output) / '_summary.json'}")
    return 0


if __name__ == "__main__":
    from unicap.cli import module_main

    sys.exit(module_main("pipelines.caption"))
