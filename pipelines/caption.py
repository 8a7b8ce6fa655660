"""The UniCap captioning job: image shards -> caption-record Parquet, one file per shard.

    unicap caption --input data/shards --output data/captions --model tiny
    python -m pipelines.caption --input ... --output ... --model Qwen/Qwen2.5-VL-7B-Instruct
    ray job submit --working-dir . -- python -m pipelines.caption --input ... --output ...
    unicap caption --input s3://b/shards --output s3://b/captions --model s3://b/runs/captioner/final

Ray Data reads the shards (datagen.shards.read_shards), an actor pool runs the captioner
(vLLM in each actor, or `--server URL` to call an OpenAI-compatible vLLM server), and the driver
writes each shard's Parquet the moment it is complete (pipelines.sink). Re-running skips complete
shards: a job killed at any moment loses nothing and writes nothing twice.
A model given as a URI (train-captioner's final/ in a bucket) is downloaded by each actor that loads it into its
node's weights cache, once per committed content: nodes that share only a bucket need no copy beforehand.
Outputs: OUTPUT/{shard}.parquet, OUTPUT/_stats/{shard}.json, OUTPUT/_summary.json.
Before Ray or an engine starts, the options, the input (complete shards) and the output folder (new,
empty or this job's own) are checked: a bad one is a one-line error (unicap.preflight.UsageError).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)

from datagen.shards import ShardFolder
from pipelines.runner import IncompleteJobError, ShardJob, exit_status, run_sharded, summarise
from pipelines.sink import STATS_DIR
from train import run_store
from train.captioner import store as captioner_store
from train.captioner.export import PROVENANCE_FILE
from unicap import config, preflight, runtime, storage
from unicap.captioner import CaptionConfig, Captioner
from unicap.contract import caption as caption_record
from unicap.engines import EngineConfig, make_engine
from unicap.prompts import PROMPT_VERSION

ITEM_FIELDS = ("key", "shard", "image", "source", "original_caption", "sha256")


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class CaptionJobConfig:
    """The `unicap caption` command line. Engine and captioner defaults are EngineConfig's and
    CaptionConfig's (referred to, not repeated); run options are run_job's defaults."""

    input: str = field(metadata=_help("folder of image shards (ingest / ingest-folder / synth)"))
    output: str = field(metadata=_help("folder for the caption Parquet files"))
    model: str = field(
        default=EngineConfig.model,
        metadata=_help("HF id, local folder, a captioner's final/ in a bucket (s3://...), or 'tiny' (random Qwen2-VL)"),
    )
    server: str | None = field(
        default=None, metadata=_help("base URL of an OpenAI-compatible vLLM server (server mode)")
    )
    levels: tuple[str, ...] = field(default=CaptionConfig.levels, metadata=_help("caption levels"))
    languages: tuple[str, ...] = field(default=CaptionConfig.languages, metadata=_help("caption languages"))
    strategy: Literal["direct", "json"] = field(default=CaptionConfig.strategy, metadata=_help("prompting strategy"))
    max_pixels: int = field(
        default=EngineConfig.max_pixels, metadata=_help("images are downscaled to this many pixels")
    )
    max_tokens: dict[str, int] = field(
        default_factory=dict, metadata=_help("per-level token limits, e.g. long=384,tags=96")
    )
    batch_size: int = field(default=16, metadata=_help("images per actor call"))
    concurrency: int = field(default=1, metadata=_help("engine actors (one per GPU, or per --tensor-parallel GPUs)"))
    tensor_parallel: int = field(
        default=EngineConfig.tensor_parallel, metadata=_help("GPUs per engine (vLLM tensor parallel)")
    )
    cpus_per_actor: float | None = field(
        default=None, metadata=_help("Ray CPUs claimed per actor (default: 1 on GPU, 0.5 on CPU)")
    )
    threads_per_actor: int | None = field(
        default=None, metadata=_help("compute threads per CPU actor (default: cores / actors)")
    )
    max_retries: int = field(default=CaptionConfig.max_retries, metadata=_help("retries of a failed caption"))
    timeout: float = field(
        default=EngineConfig.timeout_s,
        metadata=_help("deadline in seconds of each server request, answer read in full (server mode)"),
    )
    max_concurrent_requests: int = field(
        default=EngineConfig.max_concurrent, metadata=_help("in-flight requests per actor (server mode)")
    )
    address: str | None = field(default=None, metadata=_help("Ray address (default: RAY_ADDRESS or a local instance)"))
    limit_shards: int | None = field(default=None, metadata=_help("caption at most this many pending shards"))

    def __post_init__(self) -> None:
        actors = (self.concurrency, self.cpus_per_actor, self.threads_per_actor)
        check_run_options(self.batch_size, *actors, self.limit_shards)
        for name in ("input", "output"):
            if not str(getattr(self, name)).strip():
                raise preflight.UsageError(f"--{name} is empty")

    def configs(self) -> tuple[EngineConfig, CaptionConfig]:
        """The engine's and the captioner's configs; max_pixels goes to both, so they agree."""
        model = dict(model=self.model, server=self.server, tensor_parallel=self.tensor_parallel)
        requests = dict(timeout_s=self.timeout, max_concurrent=self.max_concurrent_requests)
        engine = EngineConfig(**model, **requests, max_pixels=self.max_pixels)
        asked = dict(levels=self.levels, languages=self.languages, strategy=self.strategy)
        limits = dict(max_retries=self.max_retries, max_tokens=self.max_tokens)
        caption = CaptionConfig(**asked, **limits, max_pixels=self.max_pixels)
        return engine, caption

    def run_options(self) -> dict:
        """run_job's keyword arguments, as the command line gave them."""
        names = ("batch_size", "concurrency", "cpus_per_actor", "threads_per_actor", "address", "limit_shards")
        return {name: getattr(self, name) for name in names}


def check_run_options(batch_size, concurrency, cpus_per_actor, threads_per_actor, limit_shards) -> None:
    preflight.at_least("batch_size", batch_size, 1)
    preflight.at_least("concurrency", concurrency, 1)
    preflight.above("cpus_per_actor", cpus_per_actor, 0, optional=True)
    preflight.at_least("threads_per_actor", threads_per_actor, 1, optional=True)
    preflight.at_least("limit_shards", limit_shards, 0, optional=True)


def _is_caption_output(rel: str, is_dir: bool) -> bool:
    """What the caption job writes: {shard}.parquet, _stats/{shard}.json, _summary.json."""
    if is_dir:
        return rel == STATS_DIR
    parent, _, name = rel.rpartition("/")
    if parent == STATS_DIR:
        return name.endswith(".json") and not name.startswith(".")
    return not parent and (rel == "_summary.json" or rel.endswith(".parquet") and not rel.startswith((".", "_")))


def check_folders(input_dir: str | Path, output: str | Path) -> None:
    """The input holds complete shards; the output is new, empty, or the caption job's own (local or a URI)."""
    inp, out = ShardFolder(input_dir), storage.resolve(output)
    for check, where in ((storage.check_readable, inp.loc), (storage.check_writable, out)):
        if not where.is_local:  # a bucket that does not exist, credentials missing or refused, read-only
            check(where)
    if not inp.loc.is_dir():
        raise FileNotFoundError(f"--input {inp.uri} is not a folder of image shards")
    if not inp.list():
        raise preflight.UsageError(
            f"--input {inp.uri} holds no complete shard (*_stats.json): ingest, ingest-folder or synth write them"
        )
    preflight.check_output_folder(out, _is_caption_output, "caption")


def check_model(engine_cfg: EngineConfig) -> None:
    """A model given as a URI is a complete captioner folder there (its commit file, unicap_captioner.json, which
    train-captioner uploads last), or a one-line error before Ray starts. Server mode names the server's model."""
    if engine_cfg.server or not run_store.is_uri(engine_cfg.model):
        return
    loc = storage.resolve(engine_cfg.model)
    try:
        storage.check_readable(loc)  # a missing bucket, missing or refused credentials, nothing under the prefix
    except storage.StorageError as e:
        raise storage.StorageError(f"--model {e}") from None
    if not loc.join(PROVENANCE_FILE).is_file():
        raise preflight.UsageError(
            f"--model {loc.uri} is not a complete captioner folder (no {PROVENANCE_FILE}, which "
            "train-captioner uploads last): give a captioner run's final/, a local folder or a Hugging Face id"
        )


def model_folder(engine_cfg: EngineConfig) -> str:
    """The model the engine loads on this node: a URI (nodes that share only a bucket) downloaded into the node's
    weights cache, once per committed content (train.captioner.store.local_model); anything else as given."""
    if engine_cfg.server or not run_store.is_uri(engine_cfg.model):
        return engine_cfg.model
    return str(captioner_store.local_model(engine_cfg.model))


class CaptionStage:
    """Ray Data actor: one engine per actor, loaded once; batches of shard rows -> caption rows."""

    def __init__(self, engine_cfg: dict, caption_cfg: dict):
        cfg = EngineConfig(**engine_cfg)
        engine = make_engine(replace(cfg, model=model_folder(cfg)))
        engine.model_name = cfg.model  # the records name the model as the user gave it (a URI), not this node's copy
        self.captioner = Captioner(engine, CaptionConfig(**caption_cfg))

    def __call__(self, batch: pa.Table) -> pa.Table:
        items = batch.select([f for f in ITEM_FIELDS if f in batch.column_names]).to_pylist()
        cfg = self.captioner.cfg
        return caption_record.to_table(self.captioner.caption(items), cfg.levels, cfg.languages)


def failure_rows(failures: list[dict], cfg: CaptionConfig, model: str, engine: str) -> pa.Table:
    failed = dict(status="failed", model=model, prompt_version=PROMPT_VERSION, engine=engine, num_output_tokens=0)
    rows = [{**f, **failed, "created_at": caption_record.utcnow()} for f in failures]
    return caption_record.to_table(rows, cfg.levels, cfg.languages)


def shard_stats(table: pa.Table) -> dict:
    statuses = Counter(table.column("status").to_pylist())
    reasons = Counter(caption_record.error_reason(e) for e in table.column("error").to_pylist() if e)
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
    batch_size: int = CaptionJobConfig.batch_size,
    concurrency: int = CaptionJobConfig.concurrency,
    cpus_per_actor: float | None = None,
    threads_per_actor: int | None = None,
    address: str | None = None,
    limit_shards: int | None = None,
) -> dict:
    check_run_options(batch_size, concurrency, cpus_per_actor, threads_per_actor, limit_shards)
    check_folders(input_dir, output)  # before Ray or an engine starts
    check_model(engine_cfg)
    # in-process engines go where the cluster's GPUs are, one actor per tensor-parallel group
    if engine_cfg.server:
        gpus = 0
    else:
        gpus = runtime.engine_gpus(runtime.cluster_gpus(address), engine_cfg.tensor_parallel, concurrency)
    gpu = gpus > 0
    engine_name = "vllm-server" if engine_cfg.server else "vllm"
    job = ShardJob(
        name="caption",
        stage_cls=CaptionStage,
        stage_kwargs={"engine_cfg": asdict(engine_cfg), "caption_cfg": asdict(caption_cfg)},
        schema=caption_record.caption_schema(caption_cfg.levels, caption_cfg.languages),
        stats_fn=shard_stats,
        failure_table=lambda f: failure_rows(f, caption_cfg, engine_cfg.model, engine_name),
        num_gpus=gpus,
        num_cpus=cpus_per_actor if cpus_per_actor is not None else (1 if gpu else 0.5),
        env_vars={"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_HOST_IP": "127.0.0.1"},
        threads=threads_per_actor,
        # two batches per actor: one decodes and resizes while the engine runs the other (the captioner
        # serialises engine calls); the in-process engine otherwise waits on that CPU work batch after batch
        max_concurrency=1 if engine_cfg.server else 2,
    )
    ray_opts = dict(batch_size=batch_size, concurrency=concurrency, address=address)
    run = run_sharded(job, input_dir, output, **ray_opts, limit_shards=limit_shards)
    tokens = run["this_run"].get("output_tokens", 0)
    run.update(
        tokens_per_s=round(tokens / run["seconds"], 2) if run["seconds"] and tokens else 0.0,
        engine="server " + engine_cfg.server if engine_cfg.server else "vllm",
        model=engine_cfg.model,
        strategy=caption_cfg.strategy,
    )
    return summarise(output, run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    config.add_arguments(p, CaptionJobConfig)


def run(args: argparse.Namespace) -> int:
    job = config.from_args(CaptionJobConfig, args)
    engine, caption = job.configs()
    try:
        s = run_job(job.input, job.output, engine, caption, **job.run_options())
    except IncompleteJobError as e:  # the shards that could be written are; the message names the others
        return exit_status(e)
    r = s["last_run"]
    rates = f"{r['images_per_s']} images/s, {r['tokens_per_s']} tokens/s"
    held = f"output holds {s['rows']} rows in {s['shards']} shards"
    print(f"caption: {r['images']} images in {r['seconds']}s ({rates}); {held}")
    print(f"  status: {s['status']}  failures by reason: {s['failures_by_reason']}")
    out = storage.resolve(job.output)
    print(f"  open with: pandas.read_parquet({out.uri!r})   summary: {out.join('_summary.json')}")
    return 0


if __name__ == "__main__":
    from unicap.cli import module_main

    sys.exit(module_main("pipelines.caption"))
