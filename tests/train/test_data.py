"""The loader over a packed stage: order, coverage per epoch on any world size, resume on another
world size, caption draws, bad data skipped and counted. The stage is written with the pack job's
own writer (pipelines.pack.write_packed_shard), without Ray."""

import io
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipelines.pack import row_schema, write_packed_shard
from train.buckets import bucket_table
from train.config import DataConfig
from train.data import (
    BatchPlanner,
    CaptionPicker,
    PackedBatches,
    PackedStage,
    RankBatchSampler,
    batch_rows,
    make_loader,
    sample_uniforms,
)
from unicap import storage
from unicap.atomic import write_json
from unicap.contract import caption as caption_record
from unicap.contract import packed

LEVELS, LANGUAGES = caption_record.LEVELS, caption_record.LANGUAGES
ROWS = [30, 25, 0, 17, 9]  # per file; file 00002 has only failed rows
MB = 4


def _jpeg(size: tuple[int, int], colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_stage(root, rows_per_file=ROWS, resolution=64, seed=0):
    """A packed stage of solid-colour images in 3 buckets, every caption "<column> <key>", and one
    failed row per file (which the loader must never serve)."""
    rng = np.random.default_rng(seed)
    table = bucket_table(resolution)
    buckets = [0, len(table) // 2, len(table) - 1]
    shards = [f"{i:05d}" for i in range(len(rows_per_file))]
    for shard, n in zip(shards, rows_per_file, strict=True):
        failed = {"key": f"f{shard}_failed", "shard": shard, "bucket": -1, "status": "failed"}
        rows = [{**failed, "error": "undecodable_image: synthetic"}]
        for i in range(n):
            key, b = f"f{shard}_{i:04d}", int(rng.choice(buckets))
            text = {c: f"{c} {key}" for c in caption_record.caption_columns(LEVELS, LANGUAGES)}
            colour = tuple(int(v) for v in rng.integers(0, 255, 3))
            ok = {"key": key, "shard": shard, "bucket": b, "width": table[b][0], "height": table[b][1], "status": "ok"}
            rows.append({**ok, **text, "original_caption": f"alt {key}", "image": _jpeg(table[b], colour)})
        shard_rows = pa.Table.from_pylist(rows, schema=row_schema(LEVELS, LANGUAGES))
        write_packed_shard(storage.resolve(root), shard, shard_rows)
    bucket_sizes = [list(b) for b in table]
    meta = {"version": packed.PACKED_VERSION, "resolution": resolution, "multiple": 16, "buckets": bucket_sizes}
    meta |= {"levels": list(LEVELS), "languages": list(LANGUAGES), "shards": shards, "complete": True}
    write_json(meta, root / packed.PACK_META)
    return root


def ok_keys(root) -> set[str]:
    t = packed.read_index(root, columns=["key", "status"]).to_pydict()
    return {k for k, s in zip(t["key"], t["status"], strict=True) if s == "ok"}


@pytest.fixture(scope="module")
def stage_dir(tmp_path_factory):
    return write_stage(tmp_path_factory.mktemp("packed"))


def epoch_batches(stage, seed, epoch, mb=MB):
    planner = BatchPlanner(stage, mb, seed)
    n = planner.batches_per_epoch
    return [(r.file, r.bucket, tuple(batch_rows(r, seed))) for r in map(planner.ref, range(epoch * n, (epoch + 1) * n))]


def test_stage_runs_are_small_and_cover_the_ok_rows(stage_dir):
    stage = PackedStage(stage_dir)
    assert stage.rows == sum(ROWS) and stage.missing == [] and stage.resolution == 64
    assert len(stage.run_file) <= 3 * len(ROWS) and stage.run_length.min() >= 1
    assert 2 not in set(stage.run_file)  # the file with failed rows only has no run
    assert stage.fingerprint == PackedStage(stage_dir).fingerprint


def test_epoch_order_is_a_pure_function_of_seed_and_epoch(stage_dir):
    a, b = PackedStage(stage_dir), PackedStage(stage_dir)
    e0 = epoch_batches(a, 7, 0)
    assert e0 == epoch_batches(b, 7, 0)  # another process, the same order
    assert e0 != epoch_batches(a, 7, 1) and e0 != epoch_batches(a, 8, 0)
    planner = BatchPlanner(a, MB, 7)
    n = planner.batches_per_epoch
    assert n == sum(-(-int(x) // MB) for x in a.run_length)
    for f, bucket, rows in e0:  # one bucket, one file, at most micro_batch rows per batch
        t = pq.read_table(packed.index_path(stage_dir, a.files[f]), columns=["bucket", "status"]).to_pydict()
        assert {t["bucket"][r] for r in rows} == {bucket} and {t["status"][r] for r in rows} == {"ok"}
        assert 1 <= len(rows) <= MB


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_ok_sample_is_seen_once_per_epoch(stage_dir, world_size):
    stage = PackedStage(stage_dir)
    n = BatchPlanner(stage, MB, 0).batches_per_epoch
    for epoch in (0, 1):
        seen = Counter()
        for rank in range(world_size):
            sampler = RankBatchSampler(stage, MB, 0, rank, world_size, start=epoch * n)
            for ref in sampler:
                if ref.g >= (epoch + 1) * n:
                    break
                assert (ref.g - epoch * n) % world_size == rank and ref.epoch == epoch
                seen.update((ref.file, int(r)) for r in batch_rows(ref, 0))
        assert len(seen) == sum(ROWS) and set(seen.values()) == {1}


@pytest.mark.parametrize("fraction", [0.2, 0.5, 0.9])
def test_resume_on_another_world_size_sees_each_sample_once(stage_dir, fraction):
    """W=2 trains until `consumed` global batches (a multiple of W: the trainer saves at step ends),
    then W=3 resumes from there; the epoch is covered exactly once, as the uninterrupted run covers it."""
    stage = PackedStage(stage_dir)
    n = BatchPlanner(stage, MB, 0).batches_per_epoch
    consumed = 2 * int(fraction * n / 2)
    seen, gs = Counter(), []
    for world, start, stop in ((2, 0, consumed), (3, consumed, n)):
        for rank in range(world):
            for ref in RankBatchSampler(stage, MB, 0, rank, world, start=start):
                if ref.g >= stop:
                    break
                gs.append(ref.g)
                seen.update((ref.file, int(r)) for r in batch_rows(ref, 0))
    assert sorted(gs) == list(range(n))
    assert len(seen) == sum(ROWS) and set(seen.values()) == {1}
    uninterrupted = Counter()
    for ref in map(BatchPlanner(stage, MB, 0).ref, range(n)):
        uninterrupted.update((ref.file, int(r)) for r in batch_rows(ref, 0))
    assert uninterrupted == seen


def test_a_batch_holds_one_bucket_of_images_and_their_captions(stage_dir):
    stage = PackedStage(stage_dir)
    ds = PackedBatches(stage, DataConfig(packed=str(stage_dir), resolution=64, micro_batch=MB), seed=0)
    index = packed.read_index(stage_dir).to_pandas().set_index("key")
    for g in range(6):
        batch = ds[g]
        w, h = batch["bucket"]
        b = len(batch["keys"])
        assert batch["images"].shape == (b, 3, h, w) and batch["images"].dtype == torch.float32
        assert batch["images"].min() >= -1 and batch["images"].max() <= 1 and batch["skipped"] == 0
        assert len(batch["captions"]) == b and 1 <= b <= MB and batch["g"] == g and batch["epoch"] == 0
        for key, cap in zip(batch["keys"], batch["captions"], strict=True):
            assert (index.loc[key, "width"], index.loc[key, "height"]) == (w, h)
            assert cap == "" or cap.endswith(key)


def test_loader_with_workers_on_two_ranks_covers_the_epoch(stage_dir):
    cfg = DataConfig(packed=str(stage_dir), resolution=64, micro_batch=MB, num_workers=2)
    n = BatchPlanner(PackedStage(stage_dir), MB, 3).batches_per_epoch
    keys = Counter()
    for rank in range(2):
        it = iter(make_loader(cfg, seed=3, rank=rank, world_size=2, start=0))
        for _ in range(len(range(rank, n, 2))):
            keys.update(next(it)["keys"])
    assert set(keys) == ok_keys(stage_dir) and set(keys.values()) == {1}
    with pytest.raises(ValueError, match="packed at 64 px"):
        make_loader(DataConfig(packed=str(stage_dir), resolution=256), seed=0, rank=0, world_size=1)


def test_caption_draws_follow_the_weights_and_dropout():
    cfg = DataConfig(
        level_weights={"long": 0.4, "medium": 0.3, "short": 0.2, "tags": 0.1},
        language_weights={"en": 0.7, "zh": 0.3},
        original_caption_weight=0.2,
        caption_dropout=0.1,
    )
    pick = CaptionPicker(cfg, LEVELS, LANGUAGES)
    text = {c: c for c in caption_record.caption_columns(LEVELS, LANGUAGES)} | {"original_caption": "alt"}
    n = 40_000
    u = sample_uniforms(5, 0, 0, np.arange(n))
    assert np.array_equal(u, sample_uniforms(5, 0, 0, np.arange(n))) and 0 <= u.min() and u.max() < 1
    assert not np.array_equal(u, sample_uniforms(5, 1, 0, np.arange(n)))  # another epoch, other draws
    got = Counter(pick(text, ui) for ui in u)
    assert got[""] / n == pytest.approx(0.1, abs=0.01)
    assert got["alt"] / n == pytest.approx(0.9 * 0.2, abs=0.01)
    rest = 0.9 * 0.8
    for lv, wl in cfg.level_weights.items():
        for lang, wg in cfg.language_weights.items():
            assert got[f"caption_{lv}_{lang}"] / n == pytest.approx(rest * wl * wg, abs=0.01)
    # missing captions: redrawn among those present (with their weights); none left: the alt text
    no_zh = {k: (None if k.endswith("_zh") else v) for k, v in text.items()}
    got = Counter(pick(no_zh, ui) for ui in u[:5000])
    assert not any(k.endswith("_zh") for k in got if k) and got["caption_long_en"] > got["caption_tags_en"] > 0
    assert {pick({"original_caption": "alt"}, ui) for ui in u[:200]} == {"", "alt"}
    assert pick({"caption_long_en": "  "}, u[0]) is None  # nothing usable: the loader skips and counts it


def test_bad_data_is_skipped_and_counted(tmp_path, caplog):
    root = write_stage(tmp_path / "packed", rows_per_file=[12, 12, 12])
    index = pq.read_table(packed.index_path(root, "00000")).to_pylist()
    bad = next(r for r in index if r["status"] == "ok")
    last = max((r for r in index if r["status"] == "ok"), key=lambda r: r["offset"])
    with open(packed.tar_path(root, "00000"), "r+b") as f:
        f.seek(bad["offset"])
        f.write(b"\0" * bad["size"])  # one image's bytes corrupted
        f.truncate(last["offset"] + 100)  # and the tar cut in the last image
    packed.index_path(root, "00002").unlink()  # a lost shard, known at start-up
    stage = PackedStage(root)
    assert stage.missing == ["00002"] and stage.rows == 24
    packed.tar_path(root, "00001").unlink()  # a lost tar, found while reading
    cfg = DataConfig(packed=str(root), resolution=64, micro_batch=MB)
    ds = PackedBatches(stage, cfg, seed=0)
    n = BatchPlanner(stage, MB, 0).batches_per_epoch
    batches = [ds[g] for g in range(n)]
    reasons = Counter()
    for b in batches:
        reasons.update(b["skip_reasons"])
        assert b["skipped"] == sum(b["skip_reasons"].values()) and b["images"].shape[0] == len(b["keys"])
    assert reasons == {"undecodable_image": 1, "truncated_tar": 1, "missing_file": 12}
    served = {k for b in batches for k in b["keys"]}
    assert not {bad["key"], last["key"]} & served and len(served) == 10
    assert all(k.startswith("f00000") for k in served)
    assert any("00001.tar" in r.message for r in caplog.records)


def test_missing_metadata_and_an_empty_stage_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="unicap pack"):
        PackedStage(tmp_path)
    root = write_stage(tmp_path / "empty", rows_per_file=[0])
    with pytest.raises(ValueError, match="no ok rows"):
        BatchPlanner(PackedStage(root), MB, 0)


def test_grouped_levels_give_a_micro_batch_one_column_and_each_sample_its_odds(stage_dir):
    stage = PackedStage(stage_dir)
    weights = {"long": 0.4, "medium": 0.3, "short": 0.2, "tags": 0.1}

    def columns(group: bool) -> list[list[str]]:
        mix = {"level_weights": weights, "group_caption_levels": group, "caption_dropout": 0.0}
        cfg = DataConfig(packed=str(stage_dir), resolution=64, micro_batch=MB, **mix)
        ds = PackedBatches(stage, cfg, seed=0)
        out = []
        for g in range(400):
            b = ds[g]
            out.append([c.rsplit(" ", 1)[0] for c, k in zip(b["captions"], b["keys"], strict=True)])
        return out

    grouped, mixed = columns(True), columns(False)
    assert all(len(set(cols)) == 1 for cols in grouped)  # one level x language per micro-batch
    assert sum(len(set(cols)) > 1 for cols in mixed) > 100  # per-sample draws mix them (the default)
    batches = Counter(cols[0].split("_")[1] for cols in grouped)  # each micro-batch's draw follows the weights
    for level, w in weights.items():
        assert batches[level] / len(grouped) == pytest.approx(w, abs=0.06), batches
