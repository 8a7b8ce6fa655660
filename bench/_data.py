"""Data the benches make or read for themselves: a synthetic stage packed by the real pack job, packed-stage
metadata, a shard folder's images as the captioner sees them."""

from __future__ import annotations

import tarfile
from pathlib import Path


def packed_synth_stage(data: Path, out: Path, images: int, *, seed: int, shard_size: int, **pack_kwargs) -> Path:
    """The synthetic data set (datagen.synth) in DATA, a manifest of all of it, packed into OUT by the pack job (Ray).

    pack_kwargs go to pipelines.pack.pack_stage (resolution, batch_size, concurrency). Ray is shut down afterwards,
    so that its processes neither hold a bench's cores nor outlive the packing. Both steps resume: a second call
    with the same arguments writes nothing.
    """
    import pandas as pd
    import ray

    from datagen.shards import read_index
    from datagen.synth import synth
    from pipelines.pack import pack_stage

    synth(str(data), images, seed=seed, shard_size=shard_size)
    manifest = data / "stage.parquet"
    if not manifest.exists():
        index = read_index(data)
        locations = [str(data / f"{s}.tar") for s in index["shard"]]
        columns = {"key": index.key, "shard": index["shard"], "width": index.width, "height": index.height}
        pd.DataFrame({**columns, "location": locations}).to_parquet(manifest)
    try:
        pack_stage(manifest, data / "truth", out, **pack_kwargs)
    finally:
        ray.shutdown()
    return out


def pack_meta(table, levels, languages, shards: list[str]) -> dict:
    """_pack.json's content for a stage the bench wrote itself, at 256 px (bucket TABLE), complete."""
    from unicap.contract import packed

    return {
        "version": packed.PACKED_VERSION,
        "resolution": 256,
        "multiple": 16,
        "buckets": table,
        "levels": list(levels),
        "languages": list(languages),
        "shards": shards,
        "complete": True,
    }


def load_images(shards: Path, max_pixels: int) -> list:
    """Every image of the shards in SHARDS, decoded and fitted to MAX_PIXELS as the caption job's decode step does."""
    from unicap.captioner import decode_for_model, fit_max_pixels

    out = []
    for tar_path in sorted(shards.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                if m.name.endswith((".jpg", ".jpeg", ".png", ".webp")):
                    decoded = decode_for_model(tar.extractfile(m).read(), max_pixels)
                    out.append(fit_max_pixels(decoded.image, max_pixels))
    return out
