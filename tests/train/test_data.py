"""The loader over a packed stage (train.data): batches of one bucket with their captions, two ranks with
workers covering the epoch, caption draws, bad data skipped and counted. The stage is written with the pack
job's own writer (pipelines.pack.write_packed_shard; tests/train/conftest.py: write_stage), without Ray."""

from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from tests.train.conftest import LANGUAGES, LEVELS, MB, ok_keys, write_stage
from train.batch_plan import BatchPlanner
from train.captions import CaptionPicker, sample_uniforms
from train.config import DataConfig
from train.data import PackedBatches, make_loader
from train.packed_stage import PackedStage
from unicap.contract import caption as caption_record
from unicap.contract import packed


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
