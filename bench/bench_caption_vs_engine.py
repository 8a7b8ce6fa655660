"""The caption job (`unicap caption`) against the bare vLLM engine, interleaved, on the job's steady state.

    .venv/bin/python bench/bench_caption_vs_engine.py [--cases tiny,big] [--repeats 3] [--out ...]

job   pipelines.caption.run_job: Ray Data reads the shards -> decode -> fit max_pixels -> vLLM (one actor)
      -> validate -> Parquet per shard, on a fresh local Ray (one process per leg)
bare  vllm.LLM.chat, in a process of its own, on images decoded and resized beforehand, with the job's
      prompts, sampling settings, engine arguments and batches (one batch = one shard = --batch images);
      conversations and sampling params are built before the clock starts
bare_all  the same engine given every request after the first batch in one call: vLLM schedules them all
      at once (continuous batching over the whole set), the engine's best case, which a job that writes
      one shard at a time cannot match exactly; job / bare_all is the strict number
Legs run interleaved (job, bare, bare_all, job, ...), each in a fresh process, `--repeats` times per case;
the result is the median of the per-pair ratios job/bare and job/bare_all with their min-max.

Steady state, the same for both legs: images after the first batch over the time from the end of the
first batch to the end of the last. For the job, a batch ends when its shard's Parquet is written (one
shard per batch); the first batch carries the engine's warm-up, which bare also runs untimed. Ray's and
the engine's start-up are outside both numbers; the job's end-to-end rate is reported beside.

Cases
tiny  the trained tiny captioner (train.captioner.tiny), its real output lengths and stop tokens,
      --max-pixels 28224, the default token limits
big   a random-weight Qwen2-VL of ~100M parameters (built offline here, like unicap.tiny_vlm), where
      compute matters on CPU; fixed output lengths: ignore_eos (EngineConfig.sampling_extra) so that both
      legs generate exactly max_tokens per request

The machine's load (/proc/loadavg) is recorded before and after every leg: other work on the machine
shows there.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench._data import load_images  # noqa: E402
from bench._results import save, spread  # noqa: E402
from bench._runs import ENV  # noqa: E402

LEVELS, LANGS = ("long", "medium", "short", "tags"), ("en", "zh")
LEGS = ("job", "bare", "bare_all")
BIG_VERSION = "1"
BIG_MAX_TOKENS = {"long": 24, "medium": 16, "short": 12, "tags": 12}
CASES = {
    # n images, batch (= shard size), max_pixels, max_tokens per level (None: the job's defaults), fixed lengths
    "tiny": {"n": 384, "batch": 32, "max_pixels": 28224, "max_tokens": None, "fixed": False},
    "big": {"n": 32, "batch": 8, "max_pixels": 28224, "max_tokens": BIG_MAX_TOKENS, "fixed": True},
}


def big_arch():
    from unicap.tiny_vlm import Qwen2VLArch

    # text: 10 layers x (attention 1.6M + MLP 7.1M) + embeddings ~ 89M; vision: 4 blocks of width 384 ~ 7M
    vision = dict(vision_depth=4, vision_dim=384, vision_heads=6, vision_mlp_ratio=4)
    return Qwen2VLArch(hidden=768, heads=12, kv_heads=4, layers=10, intermediate=3072, **vision, vocab_size=1024)


def big_model() -> Path:
    from unicap.tiny_build import cached
    from unicap.tiny_vlm import build_qwen2vl

    mark = {"kind": "bench-qwen2-vl-100m", "version": BIG_VERSION}

    def build(path: Path) -> None:
        build_qwen2vl(path, seed=0, arch=big_arch(), max_pixels=1024 * 1024, mark=mark)

    return cached(f"bench-qwen2-vl-100m-v{BIG_VERSION}", build)


def tiny_captioner() -> Path:
    cmd = [sys.executable, "-m", "train.captioner.tiny", "--no-train"]
    out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return Path(out.strip().splitlines()[-1])  # its last line: the model's folder


def configs(case: dict, model: str):
    from unicap.captioner import CaptionConfig
    from unicap.engines import EngineConfig

    max_pixels = case["max_pixels"]
    fixed_lengths = {"ignore_eos": True} if case["fixed"] else {}
    engine = EngineConfig(model=model, max_pixels=max_pixels, sampling_extra=fixed_lengths)
    # no retries: the job sends exactly the requests bare sends (validation still runs)
    limits = {"max_retries": 0, "max_pixels": max_pixels, "max_tokens": case["max_tokens"] or {}}
    caption = CaptionConfig(levels=LEVELS, languages=LANGS, **limits)
    return engine, caption


def leg_bare(case: dict, model: str, shards: Path, all_at_once: bool = False) -> dict:
    from vllm import LLM, SamplingParams

    from unicap import prompts
    from unicap.engines import _with_image, resolve_model, vllm_engine_kwargs

    engine_cfg, caption_cfg = configs(case, model)
    images = load_images(shards, case["max_pixels"])
    ps = prompts.prompts_for("direct", LEVELS, LANGS, caption_cfg.max_tokens)
    t_load = time.time()
    llm = LLM(model=resolve_model(model), **vllm_engine_kwargs(engine_cfg))
    load_s = time.time() - t_load
    batches = []
    for i in range(0, len(images), case["batch"]):
        convs, params = [], []
        for im in images[i : i + case["batch"]]:
            for p in ps:
                convs.append(_with_image(prompts.chat_messages(p, "x"), {"type": "image_pil", "image_pil": im}))
                params.append(SamplingParams(max_tokens=p.max_tokens, temperature=0.0, **engine_cfg.sampling_extra))
        batches.append((convs, params))
    if all_at_once:  # the first batch alone (warm-up, like the job's first shard), then the rest in one call
        rest = [sum((b[k] for b in batches[1:]), []) for k in (0, 1)]
        batches = [batches[0], tuple(rest)]
    ends, tokens = [], []
    t0 = time.time()
    for convs, params in batches:
        outs = llm.chat(convs, params, use_tqdm=False)
        ends.append(time.time())
        tokens.append(sum(len(o.outputs[0].token_ids) for o in outs))
    n_after = len(images) - case["batch"]
    return {
        "images": len(images),
        "engine_load_s": round(load_s, 2),
        "first_batch_s": round(ends[0] - t0, 2),
        "steady_s": round(ends[-1] - ends[0], 2),
        "images_per_s_steady": n_after / (ends[-1] - ends[0]),
        "tokens_per_image": sum(tokens) / len(images),
        "batch_s": batch_seconds([t0, *ends]),
    }


def leg_job(case: dict, model: str, shards: Path, threads: int | None) -> dict:
    import pyarrow.parquet as pq

    from pipelines.caption import run_job

    engine_cfg, caption_cfg = configs(case, model)
    out = Path(tempfile.mkdtemp(prefix="bench-cve-"))
    t0 = time.time()
    summary = run_job(shards, out, engine_cfg, caption_cfg, batch_size=case["batch"], threads_per_actor=threads)
    wall = time.time() - t0
    files = sorted(out.glob("*.parquet"), key=lambda p: p.stat().st_mtime)
    ends = [p.stat().st_mtime for p in files]
    after_first = summary["rows"] - pq.read_metadata(files[0]).num_rows
    return {
        "images": summary["rows"],
        "seconds_end_to_end": round(wall, 2),
        "first_shard_s": round(ends[0] - t0, 2),
        "steady_s": round(ends[-1] - ends[0], 2),
        "images_per_s_steady": after_first / (ends[-1] - ends[0]),
        "images_per_s_end_to_end": summary["rows"] / wall,
        "status": summary["status"],
        "tokens_per_image": summary["output_tokens"] / summary["rows"],
        "batch_s": batch_seconds(ends),  # from the first shard's write: its own time is first_shard_s
    }


def batch_seconds(times: list[float]) -> list[float]:
    """The seconds between consecutive TIMES: each batch's, from the end of the one before."""
    return [round(b - a, 3) for a, b in zip(times, times[1:], strict=False)]


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def run_leg(leg: str, case: str, model: Path, shards: Path, threads: int | None, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--leg", leg, "--case", case, "--model", str(model), "--shards", str(shards)]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    vllm = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_HOST_IP": "127.0.0.1", "VLLM_LOGGING_LEVEL": "WARNING"}
    env = {**ENV, **vllm, "RAY_USAGE_STATS_ENABLED": "0"}
    if threads is not None and leg.startswith("bare"):  # the same compute threads as the job's actor
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    before = loadavg()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode:
        sys.stderr.write(r.stdout[-3000:] + r.stderr[-6000:])
        raise RuntimeError(f"{leg} leg of {case} failed (exit {r.returncode})")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res.update(load_before=before, load_after=loadavg())
    return res


def spread_all(xs: list[float]) -> dict:
    return {**spread(xs), "all": [round(x, 3) for x in xs]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="tiny,big")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="compute threads of both legs: the job's actor and bare's process (default: each one's own: "
        "cores / actors for the job, torch's default for bare)",
    )
    ap.add_argument("--n", type=int, default=None, help="images per leg (default: the case's)")
    ap.add_argument("--out", default="bench/results/caption_vs_engine.json")
    ap.add_argument(
        "--legs", default="job,bare,bare_all", help="legs per pair, run in this order; ratios are job / each other leg"
    )
    ap.add_argument("--leg", choices=LEGS, help=argparse.SUPPRESS)  # one leg, in this process
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--shards", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.leg:
        case = CASES[args.case]
        if args.leg == "job":
            res = leg_job(case, args.model, Path(args.shards), args.threads)
        else:
            res = leg_bare(case, args.model, Path(args.shards), all_at_once=args.leg == "bare_all")
        print(json.dumps(res))
        return 0

    from datagen.synth import synth

    results = {
        "cores": os.cpu_count(),
        "threads_per_actor": args.threads or "job default (cores / actors)",
        "steady": "images after the first batch / (end of last batch - end of first batch); job: shard writes",
        "load_start": Path("/proc/loadavg").read_text().strip(),
        "cases": {},
    }
    t_start = time.time()
    for name in args.cases.split(","):
        case = dict(CASES[name])
        if args.n:
            case["n"] = args.n
        model = tiny_captioner() if name == "tiny" else big_model()
        shards = Path(tempfile.mkdtemp(prefix=f"bench-cve-shards-{name}-"))
        synth(str(shards), case["n"], seed=4242, shard_size=case["batch"])
        legs = []
        for rep in range(args.repeats):
            pair = {}
            for leg in args.legs.split(","):
                res = pair[leg] = run_leg(leg, name, model, shards, args.threads, timeout=600)
                load = f"load {res['load_before']:.2f}->{res['load_after']:.2f}"
                rate = f"{res['images_per_s_steady']:.2f} images/s steady"
                print(f"[{name} #{rep}] {leg}: {rate} ({res['tokens_per_image']:.1f} tokens/image, {load})", flush=True)
            others = [k for k in pair if k != "job"]
            for k in others:
                pair[f"ratio_vs_{k}"] = pair["job"]["images_per_s_steady"] / pair[k]["images_per_s_steady"]
            legs.append(pair)
        names = args.legs.split(",")
        results["cases"][name] = {
            "model": str(model),
            **{k: v for k, v in case.items()},
            **{f"ratio_job_vs_{k}": spread_all([p[f"ratio_vs_{k}"] for p in legs]) for k in names if k != "job"},
            **{f"{k}_images_per_s_steady": spread_all([p[k]["images_per_s_steady"] for p in legs]) for k in names},
            "pairs": legs,
        }
        for k in names[1:]:
            print(f"[{name}] job/{k} median {results['cases'][name][f'ratio_job_vs_{k}']}", flush=True)
    results["load_end"] = Path("/proc/loadavg").read_text().strip()
    results["wall_s"] = round(time.time() - t_start, 1)
    save(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
