"""The demo's presets and steps (`python -m pipelines.demo` runs them in order; its docstring lists them).

Each step is a function of (workdir, preset) that prints its `[step]` lines and resumes where an earlier run
stopped; `outputs` names what each one leaves behind, so that a re-run can skip it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA_STEPS = ("synth", "read", "captioner", "caption", "eval", "score", "stages", "vae")  # the data and its choice
TRAIN_STAGES = ("stage1", "stage2", "stage3")
STEPS = (*DATA_STEPS, *TRAIN_STAGES, "adherence", "report")  # in the order they run
POOL_SEED, HELDOUT_SEED = 0, 7777  # the tiny captioner trains on seed 1000's images: both sets are new to it
# the CLIP trained here (train.tiny_clip) ranks by image-text agreement over every caption column;
# the aesthetic head is random (no aesthetic ratings offline), so it has no say
CLIP_COLUMNS = [f"clip_{lv}_{lang}" for lv in ("long", "medium", "short", "tags") for lang in ("en", "zh")]
COMPOSITE = {"clip": 1.0, "aesthetic": 0.0, "clip_columns": CLIP_COLUMNS}
# The demo trains at 64 / 128 px (train/configs/stage*_cpu.yaml), a quarter of the paper's 256 / 1024 px, so
# stage2's minimum side is scaled down too (the default 1024 would leave stage2 a handful of images).
STAGE_RULES = {"stage2": {"min_side": 480}, "composite": COMPOSITE}
ADHERENCE = {"en": "adherence", "zh": "adherence_zh"}  # prompt language -> folder (the report shows English)


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


def child_env() -> dict[str, str]:
    """This environment with the repository on PYTHONPATH: what each step's child process runs with."""
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def run_step(work: Path, step: str, p: Preset) -> None:
    """One step in this process: step_<name>, or step_train for a training stage."""
    fn = globals().get(f"step_{step}")
    fn(work, p) if fn else step_train(work, p, step)


# ---------------------------------------------------------------- data: synth, read, captioner, caption, eval


def step_synth(work: Path, p: Preset) -> None:
    from datagen.synth import synth

    data, heldout = work / "data", work / "heldout"
    synth(str(data), p.pool, seed=POOL_SEED, shard_size=64)
    synth(str(heldout), p.heldout, seed=HELDOUT_SEED, shard_size=64)
    print(f"[synth] {p.pool} pool images under {data}, {p.heldout} held-out under {heldout}; answer keys in */truth")


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
    record = {"model": str(folder), "max_pixels": tiny.max_pixels(overrides=p.captioner)}
    record |= {"recipe": str(tiny.CONFIG.relative_to(ROOT)), **mark}
    (work / "captioner.json").write_text(json.dumps(record, indent=1))
    if cached:
        how = _origin(folder)
    else:
        how = "trained now" + (f", {threads} thread(s) until the VAE was done" if side else "")
    print(f"[captioner] tiny UniCap ({how}): {mark['steps']} steps, {mark['train_seconds']:.0f}s of training; {folder}")


def _origin(folder: Path) -> str:
    """How a tiny model was found: shipped with the repository (models/) or trained on this machine before."""
    from unicap.tiny_build import SHIPPED

    return f"shipped in {SHIPPED.name}/" if folder.parent == SHIPPED else "cached"


def vae_side_log(work: Path) -> Path:
    """The log of the tiny VAE trained beside the captioner."""
    return work / "logs" / "vae_beside_captioner.log"


def _start_vae_beside(work: Path) -> tuple[subprocess.Popen, int] | None:
    """`python -m train.tiny_vae` in the background with a quarter of the cores (at least one), if it is not
    cached and the machine has a core to spare; (process, its threads)."""
    from train.tiny_vae import cached_vae
    from unicap import runtime

    cores, log = os.cpu_count() or 1, vae_side_log(work)
    log.unlink(missing_ok=True)  # the progress line reads it: none from an earlier run
    if cores < 2 or cached_vae():
        return None
    threads = max(1, cores // 4)
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "train.tiny_vae", "--threads", str(threads)]
    env = {**child_env(), **runtime.threads_env(threads)}
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
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
        why = f"exit {rc}, log {vae_side_log(work)}"
        print(f"[captioner] the tiny VAE beside it failed ({why}): the vae step trains it again", flush=True)


def _captioner(work: Path) -> dict:
    path = work / "captioner.json"
    if not path.exists():
        raise RuntimeError("the captioner step has not run: run the demo without --step, or --step captioner")
    return json.loads(path.read_text())


def step_caption(work: Path, p: Preset) -> None:
    from pipelines.caption import CaptionJobConfig, run_job

    cap = _captioner(work)
    model = {"model": cap["model"], "max_pixels": cap["max_pixels"]}
    for src, dst in (("data", "captions"), ("heldout", "heldout_captions")):
        job = CaptionJobConfig(input=str(work / src), output=str(work / dst), batch_size=16, **model)
        engine, caption = job.configs()
        s = run_job(job.input, job.output, engine, caption, batch_size=job.batch_size)
        r = s["last_run"]
        written = f"{s['rows']} rows under {work / dst}"
        this_run = f"this run: {r['images']} images, {r['images_per_s']} images/s"
        failures = s["failures_by_reason"] or "none"
        print(f"[caption] {src}: {written} ({this_run}); status {s['status']}, failures {failures}")


def step_eval(work: Path, p: Preset) -> None:
    from datagen.answer_key import evaluate_folder
    from unicap.atomic import write_json
    from unicap.eval_captions import format_table

    m = evaluate_folder(work / "heldout_captions", work / "heldout")
    out = work / "heldout_captions" / "_eval.json"
    write_json(m, out)
    print(format_table(m))
    cols = m["columns"].values()
    low = {k: min(c["kinds"][k]["recall"] or 0.0 for c in cols) for k in ("colour", "shape", "background")}
    chair = max(c["hallucination"]["instance_rate"] or 0.0 for c in cols)
    recall = "lowest recall over level x language: " + ", ".join(f"{k} {v:.2f}" for k, v in low.items())
    found = f"ok {m['ok_share']:.2f}; {recall}; object hallucination up to {chair:.2f}"
    print(f"[eval] held-out captions vs the answer key: {found}; {out}")


# ---------------------------------------------------------------- selection: score, stages, vae


def step_score(work: Path, p: Preset) -> None:
    from pipelines.score import ScoreConfig, run_job
    from train import tiny_clip
    from unicap.clip import tiny_aesthetic_head

    clip = tiny_clip.tiny_clip()  # shipped in models/ (make tiny-models)
    mark = json.loads((clip / "unicap_tiny.json").read_text())
    aesthetic = str(tiny_aesthetic_head(mark["recipe"]["embed_dim"]))
    cfg = ScoreConfig(clip=str(clip), clip_multilingual=str(clip), aesthetic=aesthetic, batch_size=32, near_dedup=False)
    s = run_job(work / "data", work / "captions", work / "scores", cfg)
    auc = mark["heldout_auc"]["all"]
    judge = f"the tiny CLIP trained on synthetic pairs (held-out AUC of true vs shuffled captions {auc:.3f})"
    dups = s["last_run"].get("duplicates")
    print(f"[score] the model's captions, by {judge}: {s['rows']} rows under {work / 'scores'}; duplicates {dups}")


def step_stages(work: Path, p: Preset) -> None:
    from pipelines.stages import print_funnel, select_stages

    targets = ("1.0", "0.5", "0.5")  # stage1: the whole filtered pool; stage2, stage3: half of the stage before
    f = select_stages(work / "scores", work / "stages", *targets, rules=STAGE_RULES, shards_dir=str(work / "data"))
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
    trained = f"{how}; {mark['train_seconds']:.0f}s of training, reconstruction L1 {mark['final_l1']:.3f}"
    print(f"[vae] tiny VAE trained on the synthetic images ({trained}): {folder}")


# ---------------------------------------------------------------- training and judging: stage1..3, adherence, report


def step_train(work: Path, p: Preset, stage: str) -> None:
    """`make <stage>`'s path: train.launch packs the stage and starts 2 DeepSpeed ranks (torchrun)."""
    run = work / "runs" / stage
    final = run / "final" / "state.json"
    if final.exists():
        print(f"[{stage}] already trained: {final.parent}")
        return
    quiet = os.environ.get("VERBOSE", "") in ("", "0")
    launch = ["--stage", stage, "--config", f"train/configs/{stage}_cpu.yaml", "--data", str(work), "--nproc", "2"]
    overrides = [f"run.progress={str(not quiet).lower()}", *p.train.get(stage, ())]
    cmd = [sys.executable, "-m", "train.launch", *launch, "--", *overrides]
    r = subprocess.run(cmd, cwd=ROOT, env=child_env())
    if r.returncode != 0 or not final.exists():
        raise RuntimeError(f"{stage}: training failed (exit {r.returncode})")
    state = json.loads(final.read_text())
    loss = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    loss = [x for x in loss if x is not None]
    seen = f"{state['samples_seen']} samples ({state['skipped_samples']} skipped)"
    where = f"weights {final.parent}, samples {run / 'samples'}"
    print(f"[{stage}] {state['step']} steps, {seen}, loss {loss[0]:.3f} -> {loss[-1]:.3f}; {where}")


def step_adherence(work: Path, p: Preset) -> None:
    """stage1 and stage3 on the held-out set's long prompts (every attribute named, cells included), English and
    Chinese, with the truth images, their VAE round trip at each stage's drawing size (the ceiling) and a
    shuffled-prompt control row; judged at 64 px: stage1's size."""
    for lang, folder in ADHERENCE.items():
        paths = ["--truth", str(work / "heldout"), "--out", str(work / folder)]
        judged = ["--n", str(p.adherence), "--level", "long", "--language", lang, "--size", "64x64"]
        cmd = [sys.executable, "-m", "train.adherence", *paths, *judged]
        for stage in ("stage1", "stage3"):
            cmd += ["--weights", f"{stage}={work / 'runs' / stage / 'final'}"]
        r = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True)
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
    truths = ["--truth", str(work / "heldout"), "--truth", str(work / "data")]
    cmd = [sys.executable, "-m", "unicap.cli", "report", "--data", str(work), *truths, "--out", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, env=child_env())
    if r.returncode != 0 or not out.exists():
        raise RuntimeError(f"report failed (exit {r.returncode})")
    print(f"[report] {out.resolve()} ({out.stat().st_size // 1024} KiB): open it in a browser")


# ---------------------------------------------------------------- what each step leaves behind


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
