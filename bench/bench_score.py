"""Scoring throughput: the whole score job vs a plain loop (PIL decode + open_clip forward), one run.

Same model (--clip), same images, same work: the loop also embeds the same English captions of
every level (chunked the same way), as the job does. Also the achieved model FLOP/s of the plain
loop against a bf16 and an fp32 matrix-multiply rate measured on this machine.

    .venv/bin/python bench/bench_score.py [--n 512] [--clip tiny]
"""

from __future__ import annotations

import argparse
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._results import save  # noqa: E402


def matmul_rate(dtype) -> float:
    import torch

    a = torch.randn(2048, 2048, dtype=dtype)
    for _ in range(2):
        a @ a
    t0, n = time.perf_counter(), 10
    for _ in range(n):
        a @ a
    return 2 * 2048**3 * n / (time.perf_counter() - t0)


def forward_flops(model, size: int, tokenizer) -> tuple[float, float]:
    """FLOPs of one encode_image and one encode_text (77 tokens) forward, by torch's FlopCounterMode."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model.encode_image(torch.randn(1, 3, size, size))
    img = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model.encode_text(tokenizer(["a photo"]))
    return img, fc.get_total_flops()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--clip", default="tiny")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--out", default="bench/results/score.json")
    args = ap.parse_args()
    import ray
    import torch

    from datagen.synth import synth
    from pipelines.score import ScoreConfig, run_job
    from unicap.clip import ClipScorer
    from unicap.contract.caption import caption_column
    from unicap.decode import decode_image

    shards = Path(tempfile.mkdtemp(prefix="bench-score-"))
    synth(str(shards), args.n, seed=3, shard_size=128)
    small = Path(tempfile.mkdtemp(prefix="bench-score-small-"))
    synth(str(small), args.n // 2, seed=3, shard_size=128)

    # the plain loop: decode with PIL, preprocess, open_clip forward, batch by batch
    scorer = ClipScorer(args.clip)
    import pandas as pd

    truth = pd.read_parquet(shards / "truth").set_index("key")
    raw, caps = [], []
    for tar_path in sorted(shards.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                if m.name.endswith((".jpg", ".png")):
                    raw.append(tar.extractfile(m).read())
                    row = truth.loc[m.name.split(".")[0]]
                    caps.append([row[caption_column(lv, "en")] for lv in ("long", "medium", "short", "tags")])
    scorer.embed_images([decode_image(raw[0]).image])  # warm-up
    t0 = time.perf_counter()
    for i in range(0, len(raw), args.batch):
        img = scorer.embed_images([decode_image(b).image for b in raw[i : i + args.batch]])
        for lv in range(4):
            txt = scorer.embed_texts([c[lv] for c in caps[i : i + args.batch]])
            (img * txt).sum(1)
    loop_s = time.perf_counter() - t0

    def job(src):
        out = Path(tempfile.mkdtemp(prefix="bench-scores-"))
        t = time.time()
        run_job(src, src / "truth", out, ScoreConfig(clip=args.clip, batch_size=args.batch, near_dedup=False))
        ray.shutdown()
        return time.time() - t

    t_small, t_big = job(small), job(shards)
    marginal = (args.n - args.n // 2) / (t_big - t_small)
    size = scorer.model.visual.image_size
    size = size[0] if isinstance(size, tuple | list) else size
    img_flops, txt_flops = forward_flops(scorer.model.float(), size, scorer.tokenizer)
    chunks = sum(len(scorer.chunks(c)) for cs in caps for c in cs) / len(caps)
    flops = img_flops + chunks * txt_flops  # per image: one image forward + its caption chunks
    loop_rate = len(raw) / loop_s
    res = {
        "n": args.n,
        "clip": args.clip,
        "plain_loop_images_per_s": loop_rate,
        "job_images_per_s_end_to_end": args.n / t_big,
        "job_images_per_s_marginal": marginal,
        "ratio_job_marginal_vs_loop": marginal / loop_rate,
        "ratio_job_end_to_end_vs_loop": (args.n / t_big) / loop_rate,
        "model_gflop_per_image": flops / 1e9,
        "text_chunks_per_image": chunks,
        "loop_model_gflop_per_s": flops * loop_rate / 1e9,
        "matmul_gflop_per_s_bf16": matmul_rate(torch.bfloat16) / 1e9,
        "matmul_gflop_per_s_fp32": matmul_rate(torch.float32) / 1e9,
    }
    res["loop_fraction_of_bf16_matmul"] = res["loop_model_gflop_per_s"] / res["matmul_gflop_per_s_bf16"]
    save(res, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
