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
Tables: unicap.contract.scores (score files, embeddings) and unicap.contract.dedup (duplicates).
Captions in other languages than English are scored with --clip-multilingual when given, else null.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa

from pipelines.runner import IncompleteJobError, ShardJob, exit_status, run_sharded, summarise
from unicap import config, runtime, storage
from unicap.contract import caption as caption_record
from unicap.contract import scores
from unicap.decode import decode_image
from unicap.storage import Location


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class ScoreConfig:
    """What the score job computes and how it runs; `unicap score` options and run_job's defaults."""

    clip: str = field(
        default="tiny", metadata=_help("'tiny', NAME:PRETRAINED_TAG, NAME:/path/to/checkpoint, or a local-dir folder")
    )
    aesthetic: str | None = field(
        default=None, metadata=_help("LAION-style aesthetic head weights (state_dict file), or 'tiny'")
    )
    clip_multilingual: str | None = field(default=None, metadata=_help("open_clip spec of a multilingual text tower"))
    levels: tuple[str, ...] = field(default=caption_record.LEVELS, metadata=_help("caption levels to score"))
    languages: tuple[str, ...] = field(default=caption_record.LANGUAGES, metadata=_help("caption languages to score"))
    batch_size: int = field(default=64, metadata=_help("images per actor call"))
    concurrency: int = field(default=1, metadata=_help("open_clip actors"))
    dedup: bool = field(default=True, metadata=_help("find duplicates after the last shard"))
    near_threshold: float = field(default=0.95, metadata=_help("cosine (centred) for near duplicates"))
    near_dedup: bool = field(
        default=True,
        metadata=_help(
            "near duplicates too (off: exact only, e.g. with --clip tiny, whose random embeddings cannot tell "
            "images apart)"
        ),
    )
    precision: Literal["bf16", "fp32"] = field(default="bf16", metadata=_help("autocast (on CPU, bf16 uses AMX)"))
    device: str = field(default="auto", metadata=_help("auto | cpu | cuda (auto: cuda when the Ray cluster has GPUs)"))
    gpus_per_actor: float = field(
        default=1.0, metadata=_help("GPU share per CLIP actor (0.5: two actors per GPU; --concurrency sets how many)")
    )
    address: str | None = field(default=None, metadata=_help("Ray address (default: RAY_ADDRESS or a local instance)"))

    def __post_init__(self) -> None:
        self.levels, self.languages = tuple(self.levels), tuple(self.languages)
        scores.score_schema(self.levels, self.languages)  # names usable as columns, else ValueError
        if self.gpus_per_actor <= 0 or (self.gpus_per_actor > 1 and not float(self.gpus_per_actor).is_integer()):
            raise ValueError(f"gpus_per_actor {self.gpus_per_actor}: a share of one GPU (0, 1] or a whole number")


class ScoreStage:
    """Ray Data actor: one open_clip model per actor; batches of shard rows -> score rows."""

    def __init__(
        self,
        clip: str,
        aesthetic: str | None,
        captions: str | None,
        levels,
        languages,
        multilingual: str | None = None,
        precision: str = "bf16",
        device: str = "cpu",
    ):
        from unicap.clip import ClipScorer

        bf16 = precision == "bf16"
        self.scorer = ClipScorer(clip, aesthetic, device=device, autocast=bf16)
        self.multi = None
        if multilingual:  # the same model named twice (a CLIP that reads every language) is loaded once
            same = multilingual == clip
            self.multi = self.scorer if same else ClipScorer(multilingual, device=device, autocast=bf16)
        self.captions = storage.resolve(captions) if captions else None
        self.levels, self.languages = tuple(levels), tuple(languages)
        # a level is ok for a row when its caption is there in every language
        self.level_columns = {lv: [caption_record.caption_column(lv, g) for g in self.languages] for lv in self.levels}
        self.schema = scores.with_embedding(scores.score_schema(self.levels, self.languages))
        self._cache: dict[str, dict[str, dict]] = {}

    def _captions_of(self, shard: str) -> dict[str, dict]:
        if shard not in self._cache:
            path = self.captions.join(f"{shard}.parquet") if self.captions else None
            rows = path.read_parquet().to_pylist() if path and path.exists() else []
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
            shape = {"width": w, "height": h, "min_side": None, "aspect_ratio": None}
            if w:
                shape.update(min_side=min(w, h), aspect_ratio=max(w, h) / min(w, h))
            levels_ok = [lv for lv, cols in self.level_columns.items() if all(cap.get(c) for c in cols)]
            caption = {"caption_status": cap.get("status", "missing"), "caption_levels_ok": ",".join(levels_ok)}
            row = {"key": it["key"], "shard": it["shard"], **shape, "sha256": it["sha256"], "source": it["source"]}
            rows.append({**row, **caption, "decode_error": d.error, "clip_model": self.scorer.spec})
        for j, i in enumerate(ok):
            if np.isfinite(emb[j]).all():  # a NaN embedding is no embedding: no score derives from it
                rows[i]["embedding"] = emb[j].astype(np.float16).tolist()
            if aes is not None:
                rows[i]["aesthetic"] = finite(aes[j])
        self._score_captions(rows, ok, emb, items)
        return pa.Table.from_pylist(rows, schema=self.schema)

    def _score_captions(self, rows, ok, emb, items) -> None:
        caps = [self._captions_of(items[i]["shard"]).get(items[i]["key"], {}) for i in ok]  # the ok items' captions
        for lang in self.languages:
            scorer = self.scorer if lang == "en" else self.multi
            if scorer is None:
                continue  # no multilingual tower configured: those columns stay null
            if scorer is self.scorer:
                img = emb
            else:
                img = scorer.embed_images([decode_image(items[i]["image"]).image for i in ok])
            for lv in self.levels:
                col = caption_record.caption_column(lv, lang)
                texts = [(j, cap[col]) for j, cap in enumerate(caps) if cap.get(col)]
                if not texts:
                    continue
                te = scorer.embed_texts([t for _, t in texts])
                for (j, _), e in zip(texts, te, strict=True):
                    rows[ok[j]][scores.clip_column(lv, lang)] = finite(img[j] @ e)


def finite(value) -> float | None:
    """A score as a float, or None (missing) when it is NaN or infinite: a NaN in a score file would
    make every statistic over its column NaN downstream (stage selection treats it as missing too)."""
    value = float(value)
    return value if math.isfinite(value) else None


def failure_table(failures: list[dict], levels, languages) -> pa.Table:
    rows = []
    for f in failures:
        where = {k: f[k] for k in ("key", "shard", "sha256", "source")}
        rows.append({**where, "caption_status": "failed", "caption_levels_ok": "", "decode_error": f["error"]})
    return pa.Table.from_pylist(rows, schema=scores.with_embedding(scores.score_schema(levels, languages)))


def write_scores(output: Location, shard: str, table: pa.Table) -> None:
    """Embeddings first, the score file last: its presence marks the shard complete."""
    output.join(scores.EMBED_DIR, f"{shard}.parquet").write_parquet(table.select(scores.EMBEDDINGS_SCHEMA.names))
    output.join(f"{shard}.parquet").write_parquet(table.drop_columns([scores.EMBEDDING_FIELD.name]))


def shard_stats(table: pa.Table) -> dict:
    errors = table.column("decode_error").to_pylist()
    decoded = Counter("ok" if e is None else caption_record.error_reason(e) for e in errors)
    return {"rows": table.num_rows, "status": dict(decoded)}


def run_job(
    input_dir: str | Path, captions: str | Path | None, output: str | Path, cfg: ScoreConfig | None = None
) -> dict:
    """Score the pending shards of `input_dir` (captions from `captions`, a caption folder, or none)."""
    from unicap.dedup import write_duplicates

    cfg = cfg or ScoreConfig()
    device = runtime.cluster_device(cfg.device, cfg.address)  # the cluster's GPUs, not the driver's
    gpu = device == "cuda"
    model = dict(clip=cfg.clip, aesthetic=cfg.aesthetic, multilingual=cfg.clip_multilingual)
    captions_uri = storage.resolve(captions).uri if captions else None
    columns = dict(captions=captions_uri, levels=list(cfg.levels), languages=list(cfg.languages))
    job = ShardJob(
        name="score",
        stage_cls=ScoreStage,
        stage_kwargs={**model, **columns, "precision": cfg.precision, "device": device},
        schema=scores.with_embedding(scores.score_schema(cfg.levels, cfg.languages)),
        stats_fn=shard_stats,
        failure_table=lambda f: failure_table(f, cfg.levels, cfg.languages),
        write_fn=write_scores,
        num_cpus=1,
        num_gpus=cfg.gpus_per_actor if gpu else 0,
    )
    run = run_sharded(
        job, input_dir, output, batch_size=cfg.batch_size, concurrency=cfg.concurrency, address=cfg.address
    )
    if cfg.dedup:  # read from and written to the output's Location (a local folder or a bucket)
        dups = write_duplicates(output, near_threshold=cfg.near_threshold if cfg.near_dedup else None)
        run["duplicates"] = dict(Counter(dups.column("kind").to_pylist()))
    return summarise(output, run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, help="folder of image shards")
    p.add_argument("--captions", default=None, help="caption Parquet folder (unicap caption output or synth truth/)")
    p.add_argument("--output", required=True, help="folder for the score Parquet files")
    config.add_arguments(p, ScoreConfig)


def run(args: argparse.Namespace) -> int:
    cfg = config.from_args(ScoreConfig, args)
    if cfg.aesthetic == "tiny":
        from unicap.clip import ClipScorer, tiny_aesthetic_head

        dim = ClipScorer(cfg.clip).embed_images([_blank()]).shape[1]
        cfg = config.from_dict(ScoreConfig, {**asdict(cfg), "aesthetic": str(tiny_aesthetic_head(dim))})
    try:
        s = run_job(args.input, args.captions, args.output, cfg)
    except IncompleteJobError as e:
        return exit_status(e)
    r = s["last_run"]
    held = f"output holds {s['rows']} rows in {s['shards']} shards"
    print(f"score: {r['images']} rows in {r['seconds']}s; {held}; duplicates {r.get('duplicates')}")
    print(f"  open with: pandas.read_parquet({str(args.output)!r})")
    return 0


def _blank():
    from PIL import Image

    return Image.new("RGB", (64, 64))


if __name__ == "__main__":
    from unicap.cli import module_main

    sys.exit(module_main("pipelines.score"))
