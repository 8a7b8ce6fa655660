"""A run folder in a bucket (run.out = s3://...): checkpoints committed by their state.json, resumed from the
bucket by a process with an empty working copy; weights read from a URI (sample, convert). Real S3 server."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from safetensors.torch import load_file

from tests.train.conftest import run_trainer
from tests.train.test_model import SMALL
from train import run_store
from train.checkpoint import load_weights, save_weights
from train.model import NextDiT
from unicap import storage
from unicap.contract import checkpoint as contract

pytest_plugins = ["tests.s3_server"]
STEPS = 8


def test_a_step_folder_counts_in_a_bucket_only_once_its_state_json_is_there(s3, tmp_path, monkeypatch):
    monkeypatch.setenv("UNICAP_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    local = save_weights(tmp_path / "w", NextDiT(SMALL), "tiny-clip", "tiny")
    run = f"{s3}/runs/stage1"
    for step in (1, 2):
        run_store.upload(local, storage.resolve(f"{run}/checkpoints/{contract.step_dir_name(step)}"))
    storage.resolve(f"{run}/checkpoints/step-00000002/state.json").delete()  # a kill mid-upload: no commit
    assert [c.name for c in contract.complete_checkpoints(run)] == ["step-00000001"]
    assert contract.latest_checkpoint(run).uri == f"{run}/checkpoints/step-00000001"
    assert contract.read_state(contract.latest_checkpoint(run))["model_config"]["dim"] == SMALL.dim
    with pytest.raises(contract.CheckpointError, match="no state.json"):
        run_store.local_weights(f"{run}/checkpoints/step-00000002")

    # convert and load_weights read a URI through a local copy, downloaded once per committed state.json
    from train.convert import main as convert

    assert convert(["--to", "diffusers", f"{run}/checkpoints/step-00000001", str(tmp_path / "diffusers")]) == 0
    assert (tmp_path / "diffusers" / "config.json").is_file()
    copy = run_store.local_weights(f"{run}/checkpoints/step-00000001")
    assert (
        copy.is_relative_to(tmp_path / "cache") and run_store.local_weights(f"{run}/checkpoints/step-00000001") == copy
    )
    ours, theirs = load_file(str(local / contract.MODEL_FILE)), load_weights(copy)[0].state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_run_folder_in_a_missing_bucket_is_refused_in_one_line(packed_stage, s3, capsys):
    from train.trainer import main

    missing = s3.replace("s3://", "s3://no-such-") + "/runs"
    rc = main(["--config", "train/configs/stage1_cpu.yaml", f"data.packed={packed_stage}", f"run.out={missing}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "no-such-" in err and len(err.splitlines()) == 1, err


@pytest.mark.slow
def test_a_run_in_a_bucket_resumes_from_its_last_committed_checkpoint(packed_stage, s3, tmp_path, monkeypatch):
    """Run A trains 8 steps into the bucket (checkpoints at 4 and 8). Then step 8's upload is "killed" (its
    state.json and final/ deleted) and run B, with an empty working copy, resumes at 4 and ends as A did."""
    out, overrides = f"{s3}/runs", [f"run.steps={STEPS}", "run.save_every=4", "run.tensorboard=true"]
    samples = ["run.sample_prompts=['a red circle']", "run.sample_steps=2"]
    monkeypatch.setenv("UNICAP_CACHE", str(tmp_path / "cache-a"))
    run_trainer(packed_stage, out, [*overrides, *samples])
    run = storage.resolve(f"{out}/stage1")
    assert [c.name for c in contract.complete_checkpoints(run)] == ["step-00000004", "step-00000008"]
    assert contract.read_state(run.join(contract.FINAL_DIR))["step"] == STEPS
    names = {f.path[len(run.path) + 1 :] for f in run.files(recursive=True)}
    assert {"config.yaml", "metrics.jsonl", "samples/step-00000008.png", "final/diffusers/config.json"} <= names
    assert any(n.startswith("tb/events.out.tfevents.") for n in names)
    a_final = load_file(str(run_store.local_weights(run.join(contract.FINAL_DIR)) / contract.RAW_FILE))
    a_losses = {m["step"]: m["loss"] for m in map(json.loads, run.join("metrics.jsonl").read_text().splitlines())}

    # unicap sample reads the bucket's weights
    from train import sample

    parser = argparse.ArgumentParser()
    sample.add_arguments(parser)
    args = ["--ckpt", run.join("final").uri, "--prompt", "a red circle", "--size", "64x64", "--steps", "2"]
    assert sample.run(parser.parse_args([*args, "--out", str(tmp_path / "s")])) == 0
    assert len(list((tmp_path / "s").glob("*.png"))) == 1

    run.join("checkpoints/step-00000008/state.json").delete()
    storage.resolve(f"{run.uri}/final/state.json").delete()
    monkeypatch.setenv("UNICAP_CACHE", str(tmp_path / "cache-b"))  # another node: nothing local
    r = run_trainer(packed_stage, out, overrides)
    assert f"resuming {run.uri}/checkpoints/step-00000004" in r.stdout, r.stdout[-2000:]
    b_final = load_file(str(run_store.local_weights(run.join(contract.FINAL_DIR)) / contract.RAW_FILE))
    for k in a_final:  # the tolerance of the local resume test's losses
        assert torch.allclose(b_final[k], a_final[k], rtol=1e-5, atol=1e-7), k
    b_losses = {m["step"]: m["loss"] for m in map(json.loads, run.join("metrics.jsonl").read_text().splitlines())}
    assert sorted(b_losses) == list(range(1, STEPS + 1))  # the bucket's metrics were continued
    for s in range(1, STEPS + 1):
        assert b_losses[s] == pytest.approx(a_losses[s], rel=1e-5, abs=1e-7), (s, a_losses, b_losses)
    # the half-uploaded step 8 was replaced by B's own commit
    assert [c.name for c in contract.complete_checkpoints(run)] == ["step-00000004", "step-00000008"]
