"""`make demo`: the whole Lumina-Image 2.0 recipe, offline, on the built-in synthetic data set.

Steps run in order; each one resumes, and a re-run of `make demo` redoes only what is missing:
  synth      render a training pool (data/) and a held-out set (heldout/), both with their answer key (*/truth)
  read       read every pool shard back through the Ray Data shard reader and decode every image
  captioner  the tiny UniCap: a Qwen2-VL trained here on synthetic images (train.captioner.tiny; cached per machine)
  caption    caption pool and held-out set with it: the real job (Ray Data + vLLM) -> captions/, heldout_captions/
  eval       eval-captions: the held-out captions against the answer key (recall, hallucination, language)
  score      CLIP scores of the model's captions (a tiny CLIP trained on synthetic pairs), embeddings, duplicates
  stages     stage1 / stage2 / stage3 manifests and the funnel (DuckDB)
  vae        the tiny VAE trained on the synthetic images (train.tiny_vae; cached per machine)
  stage1..3  pack each stage and train Next-DiT on it with DeepSpeed (2 ranks, train/configs/stage*_cpu.yaml),
             each from the previous stage's final weights; sample grids in runs/<stage>/samples/
  adherence  prompt adherence (GenEval-style, judged against the answer key) of stage1 and stage3 weights, on long
             English (adherence/) and Chinese (adherence_zh/) prompts, with a shuffled-prompt control row
  report     report.html: funnel, caption statistics and accuracy, scores, gallery, loss curves, samples, adherence
Quiet by default: one line per step on the terminal (a progress bar while training), each step's full log (Ray,
vLLM, DeepSpeed) in <workdir>/logs/<step>.log; VERBOSE=1 shows everything. `--preset quick` is the same flow on
less data and shorter training (what the test suite runs). The steps and presets: pipelines.demo_steps.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from pipelines.demo_steps import PRESETS, ROOT, STEPS, TRAIN_STAGES, Preset, child_env, outputs, run_step, vae_side_log

__all__ = ["PRESETS", "STEPS", "Preset", "main", "record_times", "run_quietly"]


def record_times(log: Path, preset: str, times: dict[str, float]) -> dict:
    """Merge this run's step seconds into LOG (logs/times.json): the steps a re-run did not redo keep the times
    of the run that did them; another preset's record, or an unreadable one, is replaced."""
    try:
        earlier = json.loads(log.read_text())
    except (OSError, ValueError):
        earlier = {}
    same = isinstance(earlier, dict) and earlier.get("preset") == preset and isinstance(earlier.get("steps"), dict)
    steps = {**earlier["steps"], **times} if same else dict(times)
    record = {"preset": preset, "seconds": round(sum(steps.values()), 1), "steps": steps}
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(json.dumps(record, indent=1))
    return record


# ---------------------------------------------------------------- running quietly


def _done_file(work: Path, step: str) -> Path:
    return work / "logs" / f"{step}.done"


def is_done(work: Path, step: str, preset: str) -> bool:
    done = _done_file(work, step)
    return done.exists() and done.read_text().strip() == preset and all(o.exists() for o in outputs(work, step))


def progress_source(work: Path, step: str, p: Preset) -> tuple[Path, int, Path | None] | None:
    """(metrics.jsonl, total steps, a side build's log) of a training step, for the progress line; None for
    other steps."""
    if step == "captioner":
        from train.captioner import tiny

        metrics = tiny.run_folder(overrides=p.captioner) / "metrics.jsonl"
        return metrics, tiny.total_steps(overrides=p.captioner), vae_side_log(work)
    if step in TRAIN_STAGES:
        from train.config import load

        cfg = load(ROOT / "train" / "configs" / f"{step}_cpu.yaml", list(p.train.get(step, ())))
        return work / "runs" / step / "metrics.jsonl", cfg.run.steps, None
    return None


def _side_progress(log: Path | None) -> str:
    """ ", tiny VAE step k/N" from the last progress line of the VAE trained beside (train.tiny_vae's log)."""
    try:
        found = re.findall(r"\[tiny-vae\] step (\d+/\d+)", log.read_text(errors="replace")) if log else []
    except OSError:
        found = []
    return f"; tiny VAE beside it: step {found[-1]}" if found else ""


def _watch(stop: threading.Event, metrics: Path, total: int, side: Path | None, step: str) -> None:
    """A progress line from the step's metrics.jsonl while the child runs (the child's own bar is in its log).

    On a terminal the line is rewritten in place; otherwise (a log, CI) a line at each quarter of the steps."""
    t0, last, tty, quarter, first = time.time(), "", sys.stderr.isatty(), 0, None
    while not stop.wait(2.0):
        try:
            lines = metrics.read_text().splitlines()
            row = json.loads(lines[-1]) if lines else {}
        except (OSError, ValueError):
            row = {}
        n = row.get("step")
        if n is None:
            continue
        loss = f", loss {row['loss']:.4f}" if isinstance(row.get("loss"), float) else ""
        first = n if first is None else first  # a resumed run starts past 0: the rate counts this run's steps
        rate = (n - first) / (time.time() - t0)
        eta = f", ~{(total - n) / rate:.0f}s left" if total and rate > 0 else ""
        line = f"  [{step}] step {n}/{total or '?'}{loss}, {time.time() - t0:.0f}s{eta}{_side_progress(side)}"
        if tty:
            print("\r" + line.ljust(len(last)), end="", file=sys.stderr, flush=True)
            last = line
        elif total and n * 4 >= (quarter + 1) * total:
            quarter = n * 4 // total
            print(line, file=sys.stderr, flush=True)
    if last:
        print(file=sys.stderr)


def run_quietly(work: Path, step: str, preset: str) -> float:
    """The step in a child process, its output to logs/<step>.log; the terminal gets its [step] lines."""
    t0 = time.time()
    log = work / "logs" / f"{step}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    _done_file(work, step).unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pipelines.demo", "--workdir", str(work), "--preset", preset, "--step", step]
    env = child_env()
    source = progress_source(work, step, PRESETS[preset]())
    stop = threading.Event()
    watcher = threading.Thread(target=_watch, args=(stop, *source, step), daemon=True) if source else None
    with open(log, "w") as f:
        child = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        if watcher:
            watcher.start()
        rc = child.wait()
    stop.set()
    if watcher:
        watcher.join()
    lines = log.read_text(errors="replace").splitlines()
    funnel = ("stages:", "  - ", "  stage") if step == "stages" else ()
    shown = [ln for ln in lines if ln.startswith((f"[{step}]", *funnel)) and f"[{step}] done:" not in ln]
    if step == "eval":  # its table, as `unicap eval-captions` prints it
        shown = lines
    for ln in shown:
        print(ln)
    if rc != 0:
        tail = "\n".join(lines[-15:])
        raise SystemExit(f"demo: step {step} failed (exit {rc}); log {log}:\n{tail}")
    _done_file(work, step).write_text(preset)
    dt = time.time() - t0
    print(f"  ({step}: {dt:.1f}s, log {log})", flush=True)
    return dt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="demo", help="where the demo writes (default ./demo)")
    preset_help = "full (default): the demo; quick: less data and training (the test suite's)"
    p.add_argument("--preset", choices=sorted(PRESETS), default="full", help=preset_help)
    p.add_argument("--step", choices=STEPS, default=None, help="run one step only (what the quiet mode does)")
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("UNICAP_CACHE", str(ROOT / ".cache"))
    work = Path(args.workdir).resolve()
    preset = PRESETS[args.preset]()
    if args.step:
        run_step(work, args.step, preset)
        return 0
    t0 = time.time()
    verbose = os.environ.get("VERBOSE", "") not in ("", "0")
    times = {}
    for step in STEPS:
        if not verbose and is_done(work, step, args.preset):
            print(f"[{step}] done before: {', '.join(str(o) for o in outputs(work, step)) or 'nothing to redo'}")
            continue
        t = time.time()
        if verbose:
            run_step(work, step, preset)
        else:
            run_quietly(work, step, args.preset)
        times[step] = round(time.time() - t, 1)
    total = time.time() - t0
    if times:
        record_times(work / "logs" / "times.json", args.preset, times)
    captions = f"captions: pandas.read_parquet({str(work / 'captions')!r})"
    truth = f"answer key: pandas.read_parquet({str(work / 'data' / 'truth')!r})"
    opened = f"Open {work / 'report.html'}; {captions}; {truth}; weights {work / 'runs' / 'stage3' / 'final'}"
    print(f"demo: done in {total:.1f}s. {opened}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
