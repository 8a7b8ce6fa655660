"""What makes stage1's images follow their prompts on 2 cores: text encoder x steps x caption mix x ranks.

    .venv/bin/python bench/bench_text_encoder.py --data demo [--variants gemma-1600,captioner-1600,...]

Each variant trains stage1 from scratch on DATA's stage1 manifest and DATA/captions (a demo's are the captioner's;
bench/results/text_encoder.json was measured with the answer key copied there, data/truth -> captions/, to see the
encoder's effect apart from caption errors: its "captions" key says which) through `train.launch` (DeepSpeed,
train/configs/stage1_cpu.yaml plus the variant's overrides), then
judges its final weights on the held-out set's long English and long Chinese prompts (`train.adherence`, the
pixel judge; 32 prompts each). Adherence is a quality measure of one run per variant; `seconds` is that run's
wall time (pack excluded: packed once), so compare seconds only as a rough cost. Results:
bench/results/text_encoder.json and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._results import save  # noqa: E402
from bench._runs import ATTRS, accuracy_cells, adherence_rows, launch_cmd, run_logged  # noqa: E402

GEMMA = ("model.text_encoder=tiny",)  # a random tiny Gemma-2 (the plumbing's encoder)
CAPTIONER = ("model.text_encoder=tiny-captioner",)  # the tiny UniCap's language model (2 layers, 128 wide)
CLIP = ("model.text_encoder=tiny-clip",)  # the tiny CLIP's text tower (2 layers, 64 wide; no system prompt)
LONG_HEAVY = ("data.level_weights={long: 0.6, medium: 0.2, short: 0.1, tags: 0.1}",)
VARIANTS = {  # name: (trainer overrides, ranks)
    "gemma-random-1600": ((*GEMMA, "run.steps=1600"), 2),
    "captioner-lm-1600": ((*CAPTIONER, "run.steps=1600"), 2),
    "clip-text-1600": ((*CLIP, "run.steps=1600"), 2),
    "clip-text-1600-long": ((*CLIP, *LONG_HEAVY, "run.steps=1600"), 2),
    "clip-text-3200": ((*CLIP, "run.steps=3200"), 2),
    "clip-text-1600-1rank": ((*CLIP, "run.steps=1600", "data.micro_batch=8"), 1),
    "clip-text-400": ((*CLIP, "run.steps=400"), 2),
    "gemma-random-400": ((*GEMMA, "run.steps=400"), 2),
}


def train(data: Path, out: Path, name: str, overrides: tuple[str, ...], nproc: int) -> float:
    """Stage1 of variant NAME into OUT/NAME; its wall seconds."""
    run = [f"run.out={out / name}", "run.progress=false", "run.save_every=100000", "run.sample_every=0"]
    return run_logged(launch_cmd("stage1", data, nproc, [*run, *overrides]), out / f"{name}.log")


def judge(data: Path, out: Path, name: str, language: str, cfg: float) -> dict:
    """Variant NAME's final stage1 weights judged on 32 long prompts in LANGUAGE at guidance scale CFG."""
    dest = out / f"{name}-adherence-{language}-cfg{cfg:g}"
    prompts = ["--n", "32", "--level", "long", "--language", language, "--size", "64x64", "--cfg", str(cfg)]
    weights = ["--weights", f"{name}={out / name / 'stage1' / 'final'}"]
    return adherence_rows(data / "heldout", dest, [*prompts, *weights], dest.with_suffix(".log"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="demo", help="a full demo folder (stages/, captions/, heldout/)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {list(VARIANTS)}")
    p.add_argument("--cfg", default="4.0", help="guidance scales to judge at, comma-separated")
    p.add_argument("--work", default="/tmp/bench_text_encoder", help="run folders")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "text_encoder.json"))
    args = p.parse_args(argv)
    data, work = Path(args.data).resolve(), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {"variants": {}}
    for name in args.variants.split(","):
        overrides, nproc = VARIANTS[name]
        seconds = train(data, work, name, overrides, nproc)
        row = {"overrides": list(overrides), "ranks": nproc, "seconds": seconds, "adherence": {}}
        for cfg in (float(c) for c in args.cfg.split(",")):
            for lang in ("en", "zh"):
                rows = judge(data, work, name, lang, cfg)
                row["adherence"][f"{lang}-cfg{cfg:g}"] = rows[name]
                row["adherence"][f"{lang}-cfg{cfg:g}-shuffled"] = rows[f"{name}, shuffled prompts"]
                row["adherence"].setdefault(f"{lang}-truth", rows["truth images"])
        results["variants"][name] = row
        results["data"] = str(data)
        save(results, args.out)
    print(table(results))
    return 0


def table(results: dict) -> str:
    lines = ["| variant | prompts | seconds | " + " | ".join(ATTRS) + " |", "|---" * (3 + len(ATTRS)) + "|"]
    for name, row in results["variants"].items():
        for key, accs in row["adherence"].items():
            lines.append(f"| {name} | {key} | {row['seconds']:.0f} | {accuracy_cells(accs)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
