"""`make demo`: the whole Lumina-Image 2.0 recipe, offline, on the built-in synthetic data set.

Steps run in order; each one resumes, and a re-run of `make demo` redoes only what is missing:
  synth      render a training pool (data/) and a held-out set (heldout/), both with their answer key (*/truth)
  read       read every pool shard back through the Ray Data shard reader and decode every image
  captioner  the tiny UniCap: a Qwen2-VL trained here on synthetic images (train.captioner.tiny; cached per machine)
  caption    caption the pool and the held-out set with it: the real job (Ray Data + vLLM) -> captions/, heldout_captions/
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
less data and shorter training (what the test suite runs).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("synth", "read", "captioner", "caption", "eval", "score", "stages", "vae", "stage1", "stage2", "stage3",
         "adherence", "report")  # fmt: skip
POOL_SEED, HELDOUT_SEED = 0, 7777  # the tiny captioner trains on seed 1000's images: both sets are new to it
# The demo trains at 64 / 128 px (train/configs/stage*_cpu.yaml), a quarter of the paper's 256 / 1024 px, so
# stage2's minimum side is scaled down too (the default 1024 would leave stage2 a handful of images).
STAGE_RULES = {"stage2": {"min_side": 480},
               # the CLIP trained here (train.tiny_clip) ranks by image-text agreement over every caption column;
               # the aesthetic head is random (no aesthetic ratings offline), so it has no say
               "composite": {"clip": 1.0, "aesthetic": 0.0,
                             "clip_columns": [f"clip_{lv}_{lang}" for lv in ("long", "medium", "short", "tags")
                                              for lang in ("en", "zh")]}}  # fmt: skip


@dataclass(frozen=True)
class Preset:
    pool: int  # synthetic training images
    heldout: int  # held-out images (caption accuracy, adherence prompts)
    captioner: tuple[str, ...] = ()  # overrides of train/configs/captioner_tiny.yaml (a separate cache entry)
    train: dict[str, tuple[str, ...]] = field(default_factory=dict)  # trainer overrides per stage
    adherence: int = 32  # held-out prompts judged per weights


PRESETS = {
    "full": lambda: Preset(pool=160, heldout=40),
    "quick": lambda: Preset(
        pool=48,
        heldout=16,
        adherence=16,
        train={  # enough stage1 for the test's adherence floors (tests/pipelines/test_demo.py), little of the rest
            "stage1": ("run.steps=600", "run.save_every=300", "run.log_every=20"),
            "stage2": ("run.steps=60", "run.save_every=30", "run.log_every=10"),
            "stage3": ("run.steps=30", "run.save_every=30", "run.log_every=10"),
        },
    ),
}


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


# ---------------------------------------------------------------- steps


def step_synth(work: Path, p: Preset) -> None:
    from datagen.synth import synth

    synth(str(work / "data"), p.pool, seed=POOL_SEED, shard_size=64)
    synth(str(work / "heldout"), p.heldout, seed=HELDOUT_SEED, shard_size=64)
    print(f"[synth] {p.pool} pool images under {work / 'data'}, {p.heldout} held-out under {work / 'heldout'}; "
          "answer keys in */truth")  # fmt: skip


def step_read(work: Path, p: Preset) -> None:
    import ray

    from datagen.shards import read_shards
    from unicap import runtime
    from unicap.decode import decode_image

    runtime.init_ray(quiet=True)
    try:

        def decode(batch: dict) -> dict:
            results = [decode_image(b) for b in batch["image"]]
            return {"key": batch["key"], "ok": [r.ok for r in results]}

        rows = read_shards(work / "data").map_batches(decode, batch_size=16).take_all()
    finally:
        ray.shutdown()
    keys = {r["key"] for r in rows}
    if not len(keys) == len(rows) == p.pool:
        raise RuntimeError(
            f"expected {p.pool} unique images, read {len(rows)} ({len(keys)} unique): remove {work} and rerun"
        )
    if not all(r["ok"] for r in rows):
        raise RuntimeError(f"a synthetic image failed to decode: remove {work} and rerun")
    print(f"[read] Ray Data read and decoded {len(rows)} images, each once")


def step_captioner(work: Path, p: Preset) -> None:
    """The tiny captioner; when the tiny VAE is not cached either, it trains on its own core beside it.

    On 2 cores the captioner's first 800 steps (the vision tower alone, small matmuls) gain little from a second
    thread (0.22 s a step on 2 threads alone, 0.25 on 1 beside the VAE) and the VAE takes ~300 s on one thread:
    the two overlap. When the VAE is done the captioner stops at a checkpoint and resumes with every core (its
    later steps run 0.45 s on 2 threads, 0.55 on 1)."""
    from train.captioner import tiny

    cached = tiny.cached_captioner(overrides=p.captioner)
    side = None if cached else _start_vae_beside(work)
    threads = max(1, (os.cpu_count() or 1) - side[1]) if side else None
    released = work / "logs" / "vae_beside_captioner.done"  # the captioner takes every core back once it exists
    released.unlink(missing_ok=True)
    if side:
        threading.Thread(target=lambda: (side[0].wait(), released.touch()), daemon=True).start()
    try:
        folder = cached or tiny.tiny_captioner(overrides=p.captioner, threads=threads, threads_until=released)
    except BaseException:  # its build is atomic: stopped, it leaves nothing, and the vae step trains it again
        if side:  # SIGINT: its build's clean-up runs
            side[0].send_signal(signal.SIGINT)
            side[0].wait()
        raise
    if side:
        _finish_vae_beside(work, side[0])
    mark = json.loads((folder / "unicap_tiny.json").read_text())
    (work / "captioner.json").write_text(json.dumps({"model": str(folder), "max_pixels": tiny.max_pixels(overrides=p.captioner),
                                                    "recipe": str(tiny.CONFIG.relative_to(ROOT)), **mark}, indent=1))  # fmt: skip
    how = (
        _origin(folder) if cached else "trained now" + (f", {threads} thread(s) until the VAE was done" if side else "")
    )
    print(f"[captioner] tiny UniCap ({how}): {mark['steps']} steps, {mark['train_seconds']:.0f}s of training; {folder}")


def _origin(folder: Path) -> str:
    """How a tiny model was found: shipped with the repository (models/) or trained on this machine before."""
    from unicap.tiny_build import SHIPPED

    return f"shipped in {SHIPPED.name}/" if folder.parent == SHIPPED else "cached"


def _vae_side_log(work: Path) -> Path:
    return work / "logs" / "vae_beside_captioner.log"


def _start_vae_beside(work: Path) -> tuple[subprocess.Popen, int] | None:
    """`python -m train.tiny_vae` in the background with a quarter of the cores (at least one), if it is not
    cached and the machine has a core to spare; (process, its threads)."""
    from train.tiny_vae import cached_vae
    from unicap import runtime

    cores, log = os.cpu_count() or 1, _vae_side_log(work)
    log.unlink(missing_ok=True)  # the progress line reads it: none from an earlier run
    if cores < 2 or cached_vae():
        return None
    threads = max(1, cores // 4)
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), **runtime.threads_env(threads)}
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "train.tiny_vae", "--threads", str(threads)], stdout=f,
                                stderr=subprocess.STDOUT, env=env, cwd=ROOT)  # fmt: skip
    print(f"[captioner] training the tiny VAE beside it ({threads} thread(s), log {log})", flush=True)
    return proc, threads


def _finish_vae_beside(work: Path, proc: subprocess.Popen) -> None:
    """Wait for the VAE trained beside the captioner. A failed VAE does not fail this step: the vae step
    trains it again with every core."""
    t0 = time.time()
    rc = proc.wait()
    waited = f"; waited {time.time() - t0:.0f}s for it after the captioner" if time.time() - t0 > 1 else ""
    if rc == 0:
        print(f"[captioner] the tiny VAE trained beside it{waited}", flush=True)
    else:
        print(f"[captioner] the tiny VAE beside it failed (exit {rc}, log {_vae_side_log(work)}): "
              "the vae step trains it again", flush=True)  # fmt: skip


def _captioner(work: Path) -> dict:
    path = work / "captioner.json"
    if not path.exists():
        raise RuntimeError("the captioner step has not run: run the demo without --step, or --step captioner")
    return json.loads(path.read_text())


def step_caption(work: Path, p: Preset) -> None:
    from pipelines.caption import CaptionJobConfig, run_job

    cap = _captioner(work)
    for src, dst in (("data", "captions"), ("heldout", "heldout_captions")):
        job = CaptionJobConfig(input=str(work / src), output=str(work / dst), model=cap["model"],
                               max_pixels=cap["max_pixels"], batch_size=16)  # fmt: skip
        engine, caption = job.configs()
        s = run_job(job.input, job.output, engine, caption, batch_size=job.batch_size)
        r = s["last_run"]
        print(f"[caption] {src}: {s['rows']} rows under {work / dst} (this run: {r['images']} images, "
              f"{r['images_per_s']} images/s); status {s['status']}, failures {s['failures_by_reason'] or 'none'}")  # fmt: skip


def step_eval(work: Path, p: Preset) -> None:
    from datagen.answer_key import evaluate_folder
    from unicap.atomic import write_json
    from unicap.eval_captions import format_table

    m = evaluate_folder(work / "heldout_captions", work / "heldout")
    write_json(m, work / "heldout_captions" / "_eval.json")
    print(format_table(m))
    cols = m["columns"].values()
    low = {k: min(c["kinds"][k]["recall"] or 0.0 for c in cols) for k in ("colour", "shape", "background")}
    chair = max(c["hallucination"]["instance_rate"] or 0.0 for c in cols)
    print(f"[eval] held-out captions vs the answer key: ok {m['ok_share']:.2f}; lowest recall over level x language: "
          + ", ".join(f"{k} {v:.2f}" for k, v in low.items())
          + f"; object hallucination up to {chair:.2f}; {work / 'heldout_captions' / '_eval.json'}")  # fmt: skip


def step_score(work: Path, p: Preset) -> None:
    from pipelines.score import ScoreConfig, run_job
    from train import tiny_clip
    from unicap.clip import tiny_aesthetic_head

    clip = tiny_clip.tiny_clip()  # shipped in models/ (make tiny-models)
    mark = json.loads((clip / "unicap_tiny.json").read_text())
    cfg = ScoreConfig(clip=str(clip), clip_multilingual=str(clip), batch_size=32, near_dedup=False,
                      aesthetic=str(tiny_aesthetic_head(mark["recipe"]["embed_dim"])))  # fmt: skip
    s = run_job(work / "data", work / "captions", work / "scores", cfg)
    print(f"[score] the model's captions, by the tiny CLIP trained on synthetic pairs (held-out AUC of true vs "
          f"shuffled captions {mark['heldout_auc']['all']:.3f}): {s['rows']} rows under {work / 'scores'}; "
          f"duplicates {s['last_run'].get('duplicates')}")  # fmt: skip


def step_stages(work: Path, p: Preset) -> None:
    from pipelines.stages import print_funnel, select_stages

    f = select_stages(work / "scores", work / "stages", "1.0", "0.5", "0.5", rules=STAGE_RULES,
                      shards_dir=str(work / "data"))  # fmt: skip
    print_funnel(f)
    print(f"[stages] manifests under {work / 'stages'}")


def step_vae(work: Path, p: Preset) -> None:
    """The tiny VAE trained on the synthetic images (train.tiny_vae, cached per machine), before the stages need it.

    Usually trained already, beside the captioner (step_captioner); here with every core otherwise."""
    from train.tiny_vae import cached_vae, tiny_vae

    cached = cached_vae()
    folder = cached or tiny_vae()
    mark = json.loads((folder / "unicap_tiny.json").read_text())
    how = _origin(folder) if cached else "trained now"
    print(f"[vae] tiny VAE trained on the synthetic images ({how}; {mark['train_seconds']:.0f}s of training, "
          f"reconstruction L1 {mark['final_l1']:.3f}): {folder}")  # fmt: skip


def step_train(work: Path, p: Preset, stage: str) -> None:
    """`make <stage>`'s path: train.launch packs the stage and starts 2 DeepSpeed ranks (torchrun)."""
    final = work / "runs" / stage / "final" / "state.json"
    if final.exists():
        print(f"[{stage}] already trained: {final.parent}")
        return
    quiet = os.environ.get("VERBOSE", "") in ("", "0")
    cmd = [sys.executable, "-m", "train.launch", "--stage", stage, "--config", f"train/configs/{stage}_cpu.yaml",
           "--data", str(work), "--nproc", "2", "--", f"run.progress={str(not quiet).lower()}",
           *p.train.get(stage, ())]  # fmt: skip
    r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if r.returncode != 0 or not final.exists():
        raise RuntimeError(f"{stage}: training failed (exit {r.returncode})")
    state = json.loads(final.read_text())
    loss = [json.loads(line)["loss"] for line in (work / "runs" / stage / "metrics.jsonl").read_text().splitlines()]
    loss = [x for x in loss if x is not None]
    print(f"[{stage}] {state['step']} steps, {state['samples_seen']} samples ({state['skipped_samples']} skipped), "
          f"loss {loss[0]:.3f} -> {loss[-1]:.3f}; weights {final.parent}, samples {work / 'runs' / stage / 'samples'}")  # fmt: skip


ADHERENCE = {"en": "adherence", "zh": "adherence_zh"}  # prompt language -> folder (the report shows English)


def step_adherence(work: Path, p: Preset) -> None:
    """stage1 and stage3 on the held-out set's long prompts (every attribute named, cells included), English and
    Chinese, with the truth images, their VAE round trip at each stage's drawing size (the ceiling) and a
    shuffled-prompt control row; judged at 64 px: stage1's size."""
    for lang, folder in ADHERENCE.items():
        cmd = [sys.executable, "-m", "train.adherence", "--truth", str(work / "heldout"), "--out", str(work / folder),
               "--n", str(p.adherence), "--level", "long", "--language", lang, "--size", "64x64"]  # fmt: skip
        for stage in ("stage1", "stage3"):
            cmd += ["--weights", f"{stage}={work / 'runs' / stage / 'final'}"]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        print(r.stdout + r.stderr, end="")
        if r.returncode != 0:
            raise RuntimeError(f"adherence ({lang}) failed (exit {r.returncode})")
        rows = json.loads((work / folder / "adherence.json").read_text())["rows"]
        for name, accs in rows.items():
            shown = ", ".join(f"{k} {v:.2f}" for k, v in accs.items() if v is not None)
            print(f"[adherence] {lang} {name}: {shown}")
        print(f"[adherence] {work / folder / 'adherence.json'}")


def step_report(work: Path, p: Preset) -> None:
    out = work / "report.html"
    # both answer keys: the held-out captions' accuracy, and the pool's with its stage3 rows beside it
    r = subprocess.run([sys.executable, "-m", "unicap.cli", "report", "--data", str(work), "--truth", str(work / "heldout"),
                        "--truth", str(work / "data"),
                        "--out", str(out)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    if r.returncode != 0 or not out.exists():
        raise RuntimeError(f"report failed (exit {r.returncode})")
    print(f"[report] {out.resolve()} ({out.stat().st_size // 1024} KiB): open it in a browser")


def run_step(work: Path, step: str, p: Preset) -> None:
    fn = globals().get(f"step_{step}")
    fn(work, p) if fn else step_train(work, p, step)


# ---------------------------------------------------------------- running quietly


# Each step's outputs: present (and the step's own log says it finished) -> the step is skipped on a re-run
# without starting a process. A step whose outputs are missing runs, and the job inside resumes by itself.
def outputs(work: Path, step: str) -> list[Path]:
    return {
        "synth": [work / "data" / "truth", work / "heldout" / "truth"],
        "read": [],
        "captioner": [work / "captioner.json", *_captioner_folder(work)],
        "caption": [work / "captions" / "_summary.json", work / "heldout_captions" / "_summary.json"],
        "eval": [work / "heldout_captions" / "_eval.json"],
        "score": [work / "scores" / "_summary.json"],
        "stages": [work / "stages" / "funnel.json"],
        "vae": [],  # in the machine's cache: a stage rebuilds it if it went missing
        "adherence": [work / folder / "adherence.json" for folder in ADHERENCE.values()],
        "report": [work / "report.html"],
    }.get(step, [work / "runs" / step / "final" / "state.json"])


def _captioner_folder(work: Path) -> list[Path]:
    """The cached model captioner.json points at (gone from the cache: the step runs again)."""
    try:
        return [Path(json.loads((work / "captioner.json").read_text())["model"]) / "unicap_tiny.json"]
    except (OSError, ValueError, KeyError):
        return []


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

        return (tiny.run_folder(overrides=p.captioner) / "metrics.jsonl", tiny.total_steps(overrides=p.captioner),
                _vae_side_log(work))  # fmt: skip
    if step in ("stage1", "stage2", "stage3"):
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
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
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
    p.add_argument("--preset", choices=sorted(PRESETS), default="full",
                   help="full (default): the demo; quick: less data and training (the test suite's)")  # fmt: skip
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
    print(f"demo: done in {total:.1f}s. Open {work / 'report.html'}; captions: pandas.read_parquet({str(work / 'captions')!r}); "
          f"answer key: pandas.read_parquet({str(work / 'data' / 'truth')!r}); weights {work / 'runs' / 'stage3' / 'final'}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
