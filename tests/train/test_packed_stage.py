"""The packed stage's layout (train.packed_stage): a small run table that covers the ok rows, a stable
fingerprint, and clear errors for a folder without metadata and a stage without ok rows. The stage is written
with the pack job's own writer (tests/train/conftest.py: write_stage), without Ray."""

import pytest

from tests.train.conftest import MB, ROWS, write_stage
from train.batch_plan import BatchPlanner
from train.packed_stage import PackedStage


def test_stage_runs_are_small_and_cover_the_ok_rows(stage_dir):
    stage = PackedStage(stage_dir)
    assert stage.rows == sum(ROWS) and stage.missing == [] and stage.resolution == 64
    assert len(stage.run_file) <= 3 * len(ROWS) and stage.run_length.min() >= 1
    assert 2 not in set(stage.run_file)  # the file with failed rows only has no run
    assert stage.fingerprint == PackedStage(stage_dir).fingerprint


def test_missing_metadata_and_an_empty_stage_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="unicap pack"):
        PackedStage(tmp_path)
    root = write_stage(tmp_path / "empty", rows_per_file=[0])
    with pytest.raises(ValueError, match="no ok rows"):
        BatchPlanner(PackedStage(root), MB, 0)
