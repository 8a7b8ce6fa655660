"""The scoring job: image shards + caption Parquet -> per-shard score Parquet, embeddings, duplicates.

    unicap score --input data/shards --captions data/captions --output data/scores --clip tiny
    python -m pipelines.score ... --clip ViT-L-14:datacomp_xl_s13b_b90k --aesthetic sac+logos+ava1-l14-linearMSE.pth

Per shard (written by the shared per-shard driver, pipelines.runner):
    OUTPUT/{shard}.parquet             key, shard, width, height, min_side, aspect_ratio, sha256,
                                       caption_status, decode_error, clip_{level}_{lang}, aesthetic
    OUTPUT/_embeddings/{shard}.parquet key, embedding (unit CLIP image embedding, float16): re-score
                                       with new rules, or re-run dedup, without the model
After all shards: OUTPUT/_dedup/duplicates.parquet (key, duplicate_of, kind exact|near, similarity),
from sha256 (exact) and LSH over centred CLIP embeddings (near, unicap.dedup).
Captions in other languages than English are scored with --clip-multilingual when given, else null.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.runner import ShardJob, run_sharded, summarise
from unicap import schema
from unicap.atomic import write_parquet
from unicap.decode import decode_image
from unicap.engines import has_cuda

EMBED_DIR = "_embeddings"  # "_": not read by pandas.read_parquet(OUTPUT)
DEDUP_DIR = "_dedup"


def score_schema(levels, languages) -> pa.Schema:
    clip_cols = [pa.field(f"clip_{lv}_{lang}", pa.float32()) for lv in levels for lang in languages]
    return pa.schema([
        pa.field("key", pa.string(), nullable=False), pa.field("shard", pa.string(), nullable=False),
        pa.field("width", pa.int32()), pa.field("height", pa.int32()), pa.field("min_side", pa.int32()),
        pa.field("aspect_ratio", pa.float32()), pa.field("sha256", pa.string()), pa.field("source", pa.string()),
        pa.field("caption_status", pa.string()), pa.field("caption_levels_ok", pa.string()),
        pa.field("decode_error", pa.string()), *clip_cols, pa.field("aesthetic", pa.float32()),
        pa.field("clip_model", pa.string()), pa.field("embedding", pa.list_(pa.float16())),
    ])  # fmt: skip


class ScoreStage:
    """Ray Data actor: one open_clip model per actor; batches of shard rows -> score rows."""

    def __init__(self, clip: str, aesthetic: str | None, captions: str | None, levels, languages,
                 multilingual: str | None = None, precision: str = "bf16", device: str = "cpu"):  # fmt: skip
        from unicap.clip import ClipScorer

        bf16 = precision == "bf16"
        self.scorer = ClipScorer(clip, aesthetic, device=device, autocast=bf16)
        self.multi = ClipScorer(multilingual, device=device, autocast=bf16) if multilingual else None
        self.captions = Path(captions) if captions else None
        self.levels, self.languages = tuple(levels), tuple(languages)
        self.schema = score_schema(self.levels, self.languages)
        self._cache: dict[str, dict[str, dict]] = {}

    def _captions_of(self, shard: str) -> dict[str, dict]:
        if shard not in self._cache:
            path = self.captions / f"{shard}.parquet" if self.captions else None
            rows = pq.read_table(path).to_pylist() if path and path.exists() else []
            self._cache = {shard: {r["key"]: r for r in rows}}  # shards arrive roughly in order: keep one
        return self._cache[shard]

    def __call__(self, batch: pa.Table) -> pa.Table:
        items = batch.select(["key", "shard", "image", "sha256", "source"]).to_pylist()
        decoded = [decode_image(it["image"]) for it in items]
        ok = [i for i, d in enumerate(decoded) if d.ok]
        emb = self.scorer.embed_images([decoded[i].image for i in ok])
        aes = self.scorer.aesthetic_scores(emb)
        rows = []
        for it, d in zip(items, decoded, strict=True):
            cap = self._captions_of(it["shard"]).get(it["key"], {})
            w, h = d.width, d.height
            levels_ok = [lv for lv in self.levels if all(cap.get(f"caption_{lv}_{g}") for g in self.languages)]
            rows.append({
                "key": it["key"], "shard": it["shard"], "width": w, "height": h,
                "min_side": min(w, h) if w else None, "aspect_ratio": (max(w, h) / min(w, h)) if w else None,
                "sha256": it["sha256"], "source": it["source"], "caption_status": cap.get("status", "missing"),
                "caption_levels_ok": ",".join(levels_ok), "decode_error": d.error, "clip_model": self.scorer.spec,
            })  # fmt: skip
        for j, i in enumerate(ok):
            rows[i]["embedding"] = emb[j].astype(np.float16).tolist()
            if aes is not None:
                rows[i]["aesthetic"] = float(aes[j])
        self._score_captions(rows, ok, emb, items)
        return pa.Table.from_pylist(rows, schema=self.schema)

    def _score_captions(self, rows, ok, emb, items) -> None:
        for lang in self.languages:
            scorer = self.scorer if lang == "en" else self.multi
            if scorer is None:
                continue  # no multilingual tower configured: those columns stay null
            img = emb if scorer is self.scorer else scorer.embed_images([decode_image(items[i]["image"]).image for i in ok])
            for lv in self.levels:
                col = f"caption_{lv}_{lang}"
                texts = [(j, self._captions_of(items[i]["shard"]).get(items[i]["key"], {}).get(col)) for j, i in enumerate(ok)]
                texts = [(j, t) for j, t in texts if t]
                if not texts:
                    continue
                te = scorer.embed_texts([t for _, t in texts])
                for (j, _), e in zip(texts, te, strict=True):
                    rows[ok[j]][f"clip_{lv}_{lang}"] = float(img[j] @ e)


def failure_table(failures: list[dict], levels, languages) -> pa.Table:
    rows = [{"key": f["key"], "shard": f["shard"], "sha256": f["sha256"], "source": f["source"],
             "caption_status": "failed", "caption_levels_ok": "", "decode_error": f["error"]} for f in failures]  # fmt: skip
    return pa.Table.from_pylist(rows, schema=score_schema(levels, languages))


def write_scores(output: Path, shard: str, table: pa.Table) -> None:
    """Embeddings first, the score file last: its presence marks the shard complete."""
    write_parquet(table.select(["key", "embedding"]), output / EMBED_DIR / f"{shard}.parquet")
    write_parquet(table.drop_columns(["embedding"]), output / f"{shard}.parquet")


def shard_stats(table: pa.Table) -> dict:
    decoded = Counter("ok" if e is None else schema.error_reason(e) for e in table.column("decode_error").to_pylist())
    return {"rows": table.num_rows, "status": dict(decoded)}


def run_job(input_dir, captions, output, clip: str = "tiny", aesthetic: str | None = None, *,
            levels=schema.LEVELS, languages=schema.LANGUAGES, multilingual: str | None = None,
            batch_size: int = 64, concurrency: int = 1, address: str | None = None, dedup: bool = True,
            near_threshold: float = 0.95, near_dedup: bool = True, precision: str = "bf16",
            device: str = "auto", gpus_per_actor: float = 1.0) -> dict:  # fmt: skip
    from unicap.dedup import find_duplicates

    assert device in ("auto", "cpu", "cuda"), f"device {device!r}: auto, cpu or cuda"
    if device == "auto":
        device = "cuda" if has_cuda() else "cpu"
    gpu = device == "cuda"
    job = ShardJob(
        name="score",
        stage_cls=ScoreStage,
        stage_kwargs=dict(clip=clip, aesthetic=aesthetic, captions=str(captions) if captions else None,
                          levels=list(levels), languages=list(languages), multilingual=multilingual,
                          precision=precision, device=device),  # fmt: skip
        schema=score_schema(levels, languages),
        stats_fn=shard_stats,
        failure_table=lambda f: failure_table(f, levels, languages),
        write_fn=write_scores,
        num_cpus=1,
        num_gpus=gpus_per_actor if gpu else 0,
    )
    run = run_sharded(job, input_dir, output, batch_size=batch_size, concurrency=concurrency, address=address)
    if dedup:
        dups = find_duplicates(Path(output), near_threshold=near_threshold if near_dedup else None)
        write_parquet(dups, Path(output) / DEDUP_DIR / "duplicates.parquet")
        run["duplicates"] = dict(Counter(dups.column("kind").to_pylist()))
    return summarise(Path(output), run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, help="folder of image shards")
    p.add_argument("--captions", default=None, help="caption Parquet folder (unicap caption output or synth truth/)")
    p.add_argument("--output", required=True, help="folder for the score Parquet files")
    p.add_argument("--clip", default="tiny", help="'tiny', NAME:PRETRAINED_TAG, or NAME:/path/to/checkpoint")
    p.add_argument("--clip-multilingual", default=None, help="open_clip spec of a multilingual text tower")
    p.add_argument("--aesthetic", default=None, help="LAION-style aesthetic head weights (state_dict file)")
    p.add_argument("--levels", default=",".join(schema.LEVELS))
    p.add_argument("--languages", default=",".join(schema.LANGUAGES))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=1, help="open_clip actors")
    p.add_argument("--near-threshold", type=float, default=0.95, help="cosine (centred) for near duplicates")
    p.add_argument("--no-near-dedup", action="store_true",
                   help="exact duplicates only (e.g. with --clip tiny, whose random embeddings cannot tell images apart)")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"], help="autocast (on CPU, bf16 uses AMX)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda when present")
    p.add_argument("--gpus-per-actor", type=float, default=1.0,
                   help="GPU share per CLIP actor (0.5: two actors per GPU; --concurrency sets how many)")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or a local instance)")


def run(args: argparse.Namespace) -> int:
    aesthetic = args.aesthetic
    if aesthetic == "tiny":
        from unicap.clip import ClipScorer
        from unicap.tiny_models import tiny_aesthetic_head

        aesthetic = str(tiny_aesthetic_head(ClipScorer(args.clip).embed_images([_blank()]).shape[1]))
    s = run_job(args.input, args.captions, args.output, args.clip, aesthetic, levels=args.levels.split(","),
                languages=args.languages.split(","), multilingual=args.clip_multilingual,
                batch_size=args.batch_size, concurrency=args.concurrency, address=args.address,
                near_threshold=args.near_threshold, near_dedup=not args.no_near_dedup,
                precision=args.precision, device=args.device, gpus_per_actor=args.gpus_per_actor)  # fmt: skip
    r = s["last_run"]
    print(f"score: {r['images']} rows in {r['seconds']}s; output holds {s['rows']} rows in {s['shards']} shards; "
          f"duplicates {r.get('duplicates')}")  # fmt: skip
    print(f"  open with: pandas.read_parquet({str(args.output)!r})")
    return 0


def _blank():
    from PIL import Image

    return Image.new("RGB", (64, 64))


if __name__ == "__main__":
    from unicap.cli import module_main

    sys.exit(module_main("pipelines.score"))
