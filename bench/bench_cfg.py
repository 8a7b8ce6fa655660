"""Which classifier-free guidance scale makes the trained stages follow their prompts: scale x weights x sampling seed.

    .venv/bin/python bench/bench_cfg.py --demo demo [--scales 1,2,4,7] [--seeds 0,1,2]

Judges weights that are already trained (by default the demo's stage1 and stage3 finals) with `train.adherence`
(the pixel judge, 32 held-out long English and long Chinese prompts, each weights drawn at its training
resolution, judged at 64 px) at each guidance scale and sampling seed; the legs run interleaved (seed, then scale)
so that a busy machine slows every scale alike. Per scale it reports, for every weights x language x attribute, the
median accuracy over seeds with its min and max, and the median seconds per judge run (scale 1 skips the
unconditional pass, so it costs about half). Results: bench/results/cfg.json and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._results import save  # noqa: E402

ATTRS = ("background", "colour", "shape", "count", "position")


def main(argv: list[str] | None = None) -> int:
    from train.adherence import adherence

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", default="demo", help="a demo folder: DEMO/runs/stageN/final and DEMO/heldout")
    p.add_argument("--stages", default="stage1,stage3", help="whose final weights to judge")
    p.add_argument("--scales", default="1,2,4,7", help="guidance scales, comma-separated")
    p.add_argument("--seeds", default="0,1,2", help="sampling seeds, comma-separated")
    p.add_argument("--languages", default="en,zh")
    p.add_argument("--n", type=int, default=32, help="prompts per language")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "cfg.json"))
    args = p.parse_args(argv)
    demo = Path(args.demo).resolve()
    weights = {s: demo / "runs" / s / "final" for s in args.stages.split(",")}
    for folder in weights.values():
        if not folder.is_dir():
            raise SystemExit(f"bench_cfg: {folder} is missing: run `make demo` first (or pass --demo)")
    scales = [float(s) for s in args.scales.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    runs: list[dict] = []
    legs = [(seed, scale, lang) for seed in seeds for scale in scales for lang in args.languages.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        for seed, scale, lang in legs:
            t0 = time.perf_counter()
            judge = {
                "n": args.n,
                "level": "long",
                "language": lang,
                "cfg": scale,
                "seed": seed,
                "examples": 0,
            }
            result = adherence(
                weights, demo / "heldout", Path(tmp) / f"{seed}-{scale:g}-{lang}", control=False, **judge
            )
            seconds = time.perf_counter() - t0
            rows = {w: result["rows"][w] for w in weights}
            runs.append({"seed": seed, "cfg": scale, "language": lang, "seconds": round(seconds, 1), "rows": rows})
            print(f"seed {seed} cfg {scale:g} {lang}: {seconds:.0f}s", file=sys.stderr)
    summary = summarize(runs, list(weights), scales, args.languages.split(","))
    save({"demo": str(demo), "n": args.n, "seeds": seeds, "summary": summary, "runs": runs}, args.out)
    print(table(summary))
    return 0


def summarize(runs: list[dict], weights: list[str], scales: list[float], languages: list[str]) -> dict:
    """{cfg: {"seconds": median, "<weights> <lang>": {attr: [median, min, max] or None}}} over seeds."""
    out: dict = {}
    for scale in scales:
        mine = [r for r in runs if r["cfg"] == scale]
        entry: dict = {"seconds": statistics.median(r["seconds"] for r in mine)}
        for w in weights:
            for lang in languages:
                rows = [r["rows"][w] for r in mine if r["language"] == lang]
                cell = {}
                for a in ATTRS:
                    vals = [row[a] for row in rows if row[a] is not None]
                    cell[a] = [statistics.median(vals), min(vals), max(vals)] if vals else None
                entry[f"{w} {lang}"] = cell
        out[f"{scale:g}"] = entry
    return out


def table(summary: dict) -> str:
    lines = ["| cfg | weights | s/judge | " + " | ".join(ATTRS) + " |", "|---" * (3 + len(ATTRS)) + "|"]
    for scale, entry in summary.items():
        for key, cell in entry.items():
            if key == "seconds":
                continue
            shown = ["-" if cell[a] is None else "{:.2f} ({:.2f}-{:.2f})".format(*cell[a]) for a in ATTRS]
            cells = " | ".join(shown)
            lines.append(f"| {scale} | {key} | {entry['seconds']:.0f} | {cells} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
