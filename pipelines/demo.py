"""`make demo`: the offline end-to-end run on the built-in synthetic data set.

Steps run in order and each resumes (re-running `make demo` redoes only what is missing):
  1. synth   render the synthetic data set (shards + ground-truth captions in the caption schema)
  2. read    read every shard back through the Ray Data shard reader, decode every image
  3. caption the captioning job (Ray Data + vLLM) with the tiny random Qwen2-VL, built offline:
             it writes noise, so its rows are recorded failures (truncated); the ground truth in
             data/truth stands in for good captions in later steps. Real runs: --model Qwen/...
  4. score   CLIP scores of the ground-truth captions (the stand-in for good captions), a random
             aesthetic head, embeddings, exact duplicates (tiny random CLIP: near-dedup off)
  5. stages  stage1 / stage2 / stage3 manifests and the funnel (DuckDB)
  6. stage1, stage2, stage3   pack each stage and train Next-DiT on it with DeepSpeed (2 ranks, the CPU
             configs in train/configs/), each from the previous stage's final weights; sample grids
             from fixed prompts land in runs/<stage>/samples/
Quiet by default: one line per step on the terminal, each step's full log (Ray, vLLM, DeepSpeed) in
<workdir>/logs/<step>.log; VERBOSE=1 shows everything.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

STEPS = ("synth", "read", "caption", "score", "stages", "stage1", "stage2", "stage3")
NOT_YET = ["a trained captioner (the captions above are the tiny random model's)", "unicap report"]


def step_synth(work: Path, n: int) -> None:
    from datagen.synth import synth

    synth(str(work / "data"), n, seed=0, shard_size=32)
    print(f"[synth] {n} images under {work / 'data'}; truth in {work / 'data' / 'truth'}")


def step_read(work: Path, n: int) -> None:
    import ray

    from datagen.shards import read_shards
    from unicap import runtime
    from unicap.decode import decode_image

    runtime.init_ray(quiet=True)
    try:
        def decode(batch: dict) -> dict:
            results = [decode_image(b) for b in batch["image"]]
            return {"key": batch["key"], "ok": [r.ok for r in results], "width": [r.width for r in results]}

        rows = read_shards(work / "data").map_batches(decode, batch_size=16).take_all()
    finally:
        ray.shutdown()
    keys = {r["key"] for r in rows}
    if not len(keys) == len(rows) == n:
        raise RuntimeError(f"expected {n} unique images, read {len(rows)} ({len(keys)} unique): remove {work} and rerun")
    if not all(r["ok"] for r in rows):
        raise RuntimeError(f"a synthetic image failed to decode: remove {work} and rerun")
    print(f"[read] Ray Data read and decoded {len(rows)} images, each once")


def step_caption(work: Path) -> None:
    from pipelines.caption import CaptionJobConfig, run_job

    tokens = {"long": 48, "medium": 32, "short": 16, "tags": 16}  # the random model never stops by itself
    job = CaptionJobConfig(input=str(work / "data"), output=str(work / "captions"), model="tiny",
                           max_pixels=224 * 224, max_retries=0, max_tokens=tokens)  # fmt: skip
    engine, caption = job.configs()
    s = run_job(job.input, job.output, engine, caption, batch_size=job.batch_size)
    r = s["last_run"]
    print(f"[caption] {s['rows']} rows in {s['shards']} shards under {work / 'captions'} "
          f"(this run: {r['images']} images, {r['images_per_s']} images/s); status {s['status']}, "
          f"failures {s['failures_by_reason']}")  # fmt: skip


def step_score(work: Path) -> None:
    from PIL import Image

    from pipelines.score import ScoreConfig, run_job
    from unicap.clip import ClipScorer, tiny_aesthetic_head

    dim = ClipScorer("tiny").embed_images([Image.new("RGB", (32, 32))]).shape[1]
    cfg = ScoreConfig(clip="tiny", aesthetic=str(tiny_aesthetic_head(dim)), batch_size=32, near_dedup=False)
    s = run_job(work / "data", work / "data" / "truth", work / "scores", cfg)
    print(f"[score] {s['rows']} rows in {s['shards']} shards under {work / 'scores'}; "
          f"duplicates {s['last_run'].get('duplicates')}")  # fmt: skip


def step_stages(work: Path) -> None:
    from pipelines.stages import print_funnel, select_stages

    f = select_stages(work / "scores", work / "stages", "1.0", "0.5", "0.5", shards_dir=str(work / "data"))
    print_funnel(f)
    print(f"[stages] manifests under {work / 'stages'}")


def step_train(work: Path, stage: str) -> None:
    """`make <stage>`'s path: train.launch packs the stage and starts 2 DeepSpeed ranks (torchrun)."""
    import json

    final = work / "runs" / stage / "final" / "state.json"
    if final.exists():
        print(f"[{stage}] already trained: {final.parent}")
        return
    cmd = [sys.executable, "-m", "train.launch", "--stage", stage, "--config", f"train/configs/{stage}_cpu.yaml",
           "--data", str(work), "--nproc", "2", "--", "run.progress=false"]  # fmt: skip
    r = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    if r.returncode != 0 or not final.exists():
        raise RuntimeError(f"{stage}: training failed (exit {r.returncode})")
    state = json.loads(final.read_text())
    loss = [json.loads(line)["loss"] for line in (work / "runs" / stage / "metrics.jsonl").read_text().splitlines()]
    loss = [x for x in loss if x is not None]
    print(f"[{stage}] {state['step']} steps, {state['samples_seen']} samples ({state['skipped_samples']} skipped), "
          f"loss {loss[0]:.3f} -> {loss[-1]:.3f}; weights {final.parent}, samples {work / 'runs' / stage / 'samples'}")  # fmt: skip


def run_step(work: Path, step: str, n: int) -> None:
    {"synth": lambda: step_synth(work, n), "read": lambda: step_read(work, n), "caption": lambda: step_caption(work),
     "score": lambda: step_score(work), "stages": lambda: step_stages(work)}.get(step, lambda: step_train(work, step))()  # fmt: skip


def run_quietly(work: Path, step: str, n: int) -> float:
    """The step in a child process, its output to logs/<step>.log; the terminal gets its [step] lines."""
    t0 = time.time()
    log = work / "logs" / f"{step}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pipelines.demo", "--workdir", str(work), "--n", str(n), "--step", step]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    with open(log, "w") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    lines = log.read_text(errors="replace").splitlines()
    funnel = ("stages:", "  - ", "  stage") if step == "stages" else ()
    shown = [ln for ln in lines if ln.startswith((f"[{step}]", *funnel)) and f"[{step}] done:" not in ln]
    for ln in shown:
        print(ln)
    if r.returncode != 0:
        tail = "\n".join(lines[-15:])
        raise SystemExit(f"demo: step {step} failed (exit {r.returncode}); log {log}:\n{tail}")
    dt = time.time() - t0
    print(f"  ({step}: {dt:.1f}s, log {log})", flush=True)
    return dt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="demo", help="where the demo writes (default ./demo)")
    p.add_argument("--n", type=int, default=64, help="synthetic images (default 64)")
    p.add_argument("--step", choices=STEPS, default=None, help="run one step only (what the quiet mode does)")
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    work = Path(args.workdir)
    if args.step:
        run_step(work, args.step, args.n)
        return 0
    t0 = time.time()
    verbose = os.environ.get("VERBOSE", "") not in ("", "0")
    for step in STEPS:
        if verbose:
            run_step(work, step, args.n)
        else:
            run_quietly(work, step, args.n)
    print(f"demo: done in {time.time() - t0:.1f}s. Inspect: pandas.read_parquet({str(work / 'captions')!r}), "
          f"ground truth: pandas.read_parquet({str(work / 'data' / 'truth')!r}), "
          f"trained weights {work / 'runs' / 'stage3' / 'final'}")  # fmt: skip
    print("demo: not built yet: " + "; ".join(NOT_YET))
    return 0


if __name__ == "__main__":
    sys.exit(main())
