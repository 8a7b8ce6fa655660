"""How the demo's training seconds are best spent across its three stages: steps per stage (and the model) x adherence.

    .venv/bin/python bench/bench_schedule.py --data demo [--variants demo,s1-600,...] [--n 128]

Each variant trains stage1 -> stage2 -> stage3 through `train.launch` (DeepSpeed, 2 ranks, the CPU configs plus
the variant's overrides) on DATA's stage manifests and DATA/captions (a demo's: the captioner's captions), each
stage from the previous one's final weights, into WORK/<variant>/. The variant `demo` trains nothing: it judges
DATA/runs as `make demo` left them (the CPU configs as they are). Stage1's and stage3's final weights are then
judged by the pixel judge (`train.adherence`) on N long English and N long Chinese prompts of a held-out set the
bench renders itself (seed 9999, N images: more prompts than the demo's 40 held-out images, so that a difference of
0.1 is not within one variant's sampling noise), with the shuffled-prompt control row of stage3. `seconds` are each
stage's wall time (launch, training, samples, save): one run per variant, a rough cost, not a timing comparison.
One training seed per variant, except the `<name>-seed1` copies (run.seed=1) of some: two seeds of the CPU configs
agree within 0.03 on 128 prompts, two of other variants differ by up to 0.11 in colour, so read a single seed's
differences below ~0.1 as noise. Results: bench/results/schedule.json and a markdown table on stdout.

`pool640-s1-600` is the `demo` variant on a demo folder made with 640 pool images instead of 160 (a local preset,
`Preset(pool=640, heldout=40, train={"stage1": ("run.steps=600",)})` in pipelines/demo.py, then
`--data /tmp/demo640 --variants demo --name pool640-s1-600`): four times the images at the same steps.
`s1-600-answer-key` is `s1-600` trained on the answer key's captions instead of the captioner's: a data folder with
the demo's stages/, data/ and heldout/ but no captions/ (train.launch then reads data/truth), run as
`--data /tmp/truthdemo --variants s1-600 --out /tmp/truth.json` and stored under that name: what perfect captions
would buy.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._results import save  # noqa: E402
from bench._runs import ATTRS, accuracy_cells, adherence_rows, launch_cmd, run_logged  # noqa: E402

STAGES = ("stage1", "stage2", "stage3")
HELDOUT_SEED = 9999  # neither the pool's (0), the demo's held-out set's (7777) nor the captioner's (1000)


def steps(s1: int, s2: int, s3: int) -> dict[str, tuple[str, ...]]:
    return {stage: (f"run.steps={n}",) for stage, n in zip(STAGES, (s1, s2, s3), strict=True)}


def plus(base: dict[str, tuple[str, ...]], *extra: str, stages=STAGES) -> dict[str, tuple[str, ...]]:
    """BASE's per-stage overrides with EXTRA appended to those of STAGES."""
    return {stage: (*v, *extra) if stage in stages else v for stage, v in base.items()}


S1_600 = steps(600, 1200, 400)  # the CPU configs' steps
LATER = ("stage2", "stage3")

# name: trainer overrides per stage (None: judge DATA/runs as `make demo` trained them; store it under --name)
VARIANTS: dict[str, dict[str, tuple[str, ...]] | None] = {
    "demo": None,
    # the CPU configs up to 4306ec1 (measured as `demo` with --name s1-1600)
    "s1-1600": steps(1600, 1200, 400),
    # less 64 px training (64 px images carry little shape): the CPU configs now
    "s1-600": S1_600,
    # the seconds saved moved to 128 px
    "s1-600-s2-2400": steps(600, 2400, 400),
    # stage2/3's loss on the 4x-pooled velocities (the release's auxiliary loss) 4x heavier: the coarse layout
    "s1-600-lowres4": plus(S1_600, "loss.lowres_weight=4.0", stages=LATER),
    # a wider, deeper Next-DiT (dim 384, 6 layers, 2 refiner layers: 26.8M parameters, 14x NextDiT_tiny's, and ~4x
    # its seconds per step here), on half of s1-600's stage2 and stage3 steps (more stage2 steps gave no shape)
    "S-s1-600-s2-600": plus(steps(600, 600, 200), "model.name=NextDiT_S"),
    # RoPE base 100 instead of the release's 10,000: on a 4x4 / 8x8 token grid only 2 of each spatial axis's 6
    # frequencies turn by more than ~0.3 rad across the image at 10,000, 4 at 100 (neighbouring tokens told apart)
    "rope100": plus(S1_600, "model.rope_theta=100"),
    # stage2/3's training times drawn nearer noise (logit-normal centred at -0.5 or -1, not 0): more of the steps where
    # an image's layout (where its objects are, how many) is decided
    "s23-noisier": plus(S1_600, "loss.time_loc=-0.5", stages=LATER),
    "s23-noisier1": plus(S1_600, "loss.time_loc=-1.0", stages=LATER),
    # image tokens told their place in the frame (model.frame_pos: a fixed sin-cos code added to them; RoPE alone gives
    # a token only its offsets to others): "at the top left" and "two" need absolute places
    "frame": plus(S1_600, "model.frame_pos=true"),
    # fewer steps, for the demo's 20 minutes on a 2-core AVX2 machine (fp32: ~0.31 s/step at 64 px, ~0.59 at 128)
    "s1-300-s3-200": steps(300, 1200, 200),
    "s1-300-s2-900-s3-200": steps(300, 900, 200),
}
# a second training seed (initial weights, noise, times, caption draws) of some, to read their differences against
SEEDED = ("s1-600", "s23-noisier", "s1-300-s2-900-s3-200", "s1-300-s3-200")
VARIANTS |= {f"{name}-seed1": plus(VARIANTS[name], "run.seed=1") for name in SEEDED}


def train(data: Path, out: Path, overrides: dict[str, tuple[str, ...]]) -> dict[str, float]:
    seconds = {}
    for stage in STAGES:
        trainer = [f"run.out={out}", "run.progress=false", "run.sample_every=0", *overrides.get(stage, ())]
        seconds[stage] = run_logged(launch_cmd(stage, data, 2, trainer), out / f"{stage}.log")
    return seconds


def judge(truth: Path, runs: Path, dest: Path, language: str, n: int) -> dict:
    weights = [arg for s in ("stage1", "stage3") for arg in ("--weights", f"{s}={runs / s / 'final'}")]
    prompts = ["--n", str(n), "--level", "long", "--language", language, "--size", "64x64", "--examples", "4"]
    return adherence_rows(truth, dest, [*prompts, *weights], dest.with_suffix(".log"))


def heldout(work: Path, n: int) -> Path:
    from datagen.synth import synth

    folder = work / f"heldout-{HELDOUT_SEED}-{n}"
    if not (folder / "truth").is_dir():
        synth(str(folder), n, seed=HELDOUT_SEED, shard_size=64)
    return folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="demo", help="a full demo folder (stages/, captions/, runs/ for `demo`)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {list(VARIANTS)}")
    p.add_argument("--name", default=None, help="the results' name of the `demo` variant (default demo)")
    p.add_argument("--n", type=int, default=128, help="held-out prompts per language (default 128)")
    p.add_argument("--work", default="/tmp/bench_schedule", help="run folders")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "schedule.json"))
    args = p.parse_args(argv)
    data, work = Path(args.data).resolve(), Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    truth = heldout(work, args.n)
    results = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {"variants": {}}
    results |= {"prompts": args.n, "heldout_seed": HELDOUT_SEED, "cpu": cpu()}
    for name in args.variants.split(","):
        overrides = VARIANTS[name]
        runs = data / "runs" if overrides is None else work / name
        runs.mkdir(parents=True, exist_ok=True)
        seconds = seconds_of(data) if overrides is None else train(data, runs, overrides)
        row: dict = {"data": str(data), "overrides": overrides, "seconds": seconds}
        row["adherence"] = {lang: judge(truth, runs, work / f"{name}-{lang}", lang, args.n) for lang in ("en", "zh")}
        results["variants"][args.name if overrides is None and args.name else name] = row
        save(results, args.out)
    print(table(results))
    return 0


def seconds_of(data: Path) -> dict[str, float]:
    """The demo's own stage times (logs/times.json), for the `demo` variant."""
    steps_ = json.loads((data / "logs" / "times.json").read_text())["steps"]
    return {stage: steps_[stage] for stage in STAGES if stage in steps_}


def cpu() -> str:
    import torch

    from unicap import runtime

    return f"{os.cpu_count()} cores, {runtime.resolve_precision('auto', 'cpu')}, torch {torch.__version__}"


def table(results: dict) -> str:
    lines = [
        "| variant | seconds (s1 / s2 / s3) | weights | " + " | ".join(ATTRS) + " |",
        "|---" * (3 + len(ATTRS)) + "|",
    ]
    for name, row in results["variants"].items():
        secs = " / ".join(f"{row['seconds'].get(s, 0):.0f}" for s in STAGES)
        for lang, rows in row["adherence"].items():
            for weights, accs in rows.items():
                if weights == "truth images":
                    continue
                lines.append(f"| {name} | {secs} | {lang} {weights} | {accuracy_cells(accs)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
