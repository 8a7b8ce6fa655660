"""train-captioner with its run folder in a bucket (run.out = s3://...): checkpoints committed by their state.json,
final/ by unicap_captioner.json; a resume on a node that never saw the run continues from the bucket; a model
folder read back from a URI for `unicap caption --model`. Real S3 server (moto's server mode)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import free_port
from train.captioner import store
from train.captioner.export import PROVENANCE_FILE
from unicap import storage
from unicap.contract import checkpoint as contract

pytest_plugins = ["tests.s3_server"]
BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[3]
STEPS = 4


def test_a_model_folder_in_a_bucket_counts_only_once_its_commit_file_is_there(s3, tmp_path, monkeypatch):
    monkeypatch.setenv("UNICAP_CACHE", str(tmp_path / "cache"))
    local = tmp_path / "final"
    (local / "sub").mkdir(parents=True)
    (local / "config.json").write_text("{}")
    (local / "sub" / "extra.txt").write_text("x")
    (local / ".hidden.tmp").write_text("never uploaded")
    with pytest.raises(FileNotFoundError, match=PROVENANCE_FILE):  # an incomplete local folder is not published
        store.upload(local, storage.resolve(f"{s3}/final"), commit=PROVENANCE_FILE)
    (local / PROVENANCE_FILE).write_text(json.dumps({"step": 1}))
    remote = storage.resolve(f"{s3}/run/final")
    store.upload(local, remote, commit=PROVENANCE_FILE)
    names = {f.path[len(remote.path) + 1 :] for f in remote.files(recursive=True)}
    assert names == {"config.json", "sub/extra.txt", PROVENANCE_FILE}

    copy = store.local_model(remote.uri)
    assert copy.is_relative_to(tmp_path / "cache") and (copy / "sub" / "extra.txt").read_text() == "x"
    assert store.local_model(remote.uri) == copy  # the same commit: not downloaded again
    assert store.local_model(str(local)) == local  # a local folder as it is

    # a re-publish un-commits first: a kill mid-upload leaves a folder nobody reads
    (local / PROVENANCE_FILE).write_text(json.dumps({"step": 2}))
    (local / "sub" / "extra.txt").unlink()
    remote.join(PROVENANCE_FILE).delete()
    with pytest.raises(storage.StorageError, match=f"no {PROVENANCE_FILE}"):
        store.local_model(remote.uri)
    store.upload(local, remote, commit=PROVENANCE_FILE)
    assert not remote.join("sub/extra.txt").exists()  # files the new folder lacks are gone
    again = store.local_model(remote.uri)
    assert again == copy and json.loads((again / PROVENANCE_FILE).read_text()) == {"step": 2}
    assert not (again / "sub" / "extra.txt").exists()  # the newer commit replaced the older copy whole


def test_a_captioner_run_folder_in_a_missing_bucket_is_refused_in_one_line(s3, capsys):
    from train.captioner.trainer import main

    missing = s3.replace("s3://", "s3://no-such-") + "/runs/captioner"
    rc = main(["--config", "train/configs/captioner_tiny.yaml", f"run.out={missing}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "no-such-" in err and len(err.splitlines()) == 1, err


def test_a_base_model_only_another_machine_holds_is_refused_in_one_line():
    from train.captioner.checkpoint import TrainingError
    from train.captioner.config import load
    from train.captioner.trainer import resume_base

    cfg = load("train/configs/captioner_tiny.yaml", ["model.init=/elsewhere/qwen2-vl-2b"])
    assert resume_base("Qwen/Qwen2-VL-2B-Instruct", cfg) == "Qwen/Qwen2-VL-2B-Instruct"  # a hub id as it is
    with pytest.raises(TrainingError, match="/elsewhere/qwen2-vl-2b, which this machine lacks"):
        resume_base("/elsewhere/qwen2-vl-2b", cfg)


def launch(out: str, cache: Path, *extra: str) -> subprocess.CompletedProcess:
    """A few steps of the tiny captioner on synthetic images: one rank, fp32 on CPU, no grounding."""
    args = [f"run.out={out}", f"run.steps={STEPS}", "run.save_every=2", "run.keep_last=2", "run.max_minutes=0"]
    args += ["data.micro_batch=2", "data.global_batch=2", "data.num_workers=0", f"data.max_pixels={112 * 112}"]
    args += ["data.single_group_until=0", "model.grounding=false", "optim.ground_first_steps=0"]
    args += ["optim.warmup_steps=1", "optim.schedule=constant", "model.export_dtype=float32"]
    args += ["run.progress=false", "run.log_every=1", "run.threads=1", "deepspeed.precision=fp32", *extra]
    cmd = [str(BIN / "unicap"), "train-captioner", "--config", "train/configs/captioner_tiny.yaml"]
    cmd += ["--nproc", "1", "--master-port", str(free_port()), *args]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT), "UNICAP_CACHE": str(cache)}
    r = subprocess.run(cmd, cwd=ROOT, env={**env, "TOKENIZERS_PARALLELISM": "false"}, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def bucket_losses(run: storage.Location) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in map(json.loads, run.join("metrics.jsonl").read_text().splitlines())}


@pytest.mark.slow
def test_a_captioner_run_in_a_bucket_resumes_on_a_node_that_never_saw_it(s3, tmp_path):
    """Run A trains 4 steps into the bucket (checkpoints at 2 and 4, then final/). Then step 4's upload and
    final/'s are "killed" (their commit files deleted) and run B, with an empty $UNICAP_CACHE (no working copy,
    no tiny base), resumes at step 2 from the bucket and ends with A's weights."""
    out = f"{s3}/runs/captioner"
    run = storage.resolve(out)
    launch(out, tmp_path / "cache-a")
    assert [c.name for c in contract.complete_checkpoints(run)] == ["step-00000002", "step-00000004"]
    names = {f.path[len(run.path) + 1 :] for f in run.files(recursive=True)}
    assert {"config.yaml", "metrics.jsonl", "final/config.json", "final/model.safetensors"} <= names
    assert json.loads(run.join("final", PROVENANCE_FILE).read_bytes())["step"] == STEPS
    a_final = store.local_model(run.join("final"))  # what `unicap caption --model s3://.../final` loads
    a_weights = load_file(str(a_final / "model.safetensors"))
    a_losses = bucket_losses(run)
    assert sorted(a_losses) == list(range(1, STEPS + 1))

    from transformers import AutoModelForImageTextToText, AutoTokenizer

    AutoModelForImageTextToText.from_pretrained(a_final)  # a model folder as it is
    AutoTokenizer.from_pretrained(a_final)

    run.join("checkpoints/step-00000004/state.json").delete()
    run.join("final", PROVENANCE_FILE).delete()
    shutil.rmtree(tmp_path / "cache-a")  # A's node is gone: its working copy and the tiny base it trained from
    r = launch(out, tmp_path / "cache-b")
    assert f"resuming {out}/checkpoints/step-00000002" in r.stdout and f"steps 2 -> {STEPS}" in r.stdout, r.stdout
    assert [c.name for c in contract.complete_checkpoints(run)] == ["step-00000002", "step-00000004"]
    assert list((tmp_path / "cache-b" / "models").glob("tiny-captioner-base-*"))  # the same tiny base, built here
    b_weights = load_file(str(store.local_model(run.join("final")) / "model.safetensors"))
    assert b_weights.keys() == a_weights.keys()
    for k in a_weights:  # one rank, one thread, fp32 both times: the resumed half repeats A's arithmetic
        assert (b_weights[k] - a_weights[k]).abs().max().item() <= 1e-5 * (1 + a_weights[k].abs().max().item()), k
    b_losses = bucket_losses(run)
    assert sorted(b_losses) == list(range(1, STEPS + 1))  # the bucket's metrics were continued
    for s in range(1, STEPS + 1):
        assert b_losses[s] == pytest.approx(a_losses[s], rel=1e-4, abs=1e-6), (s, a_losses, b_losses)

    r = launch(out, tmp_path / "cache-c")  # finished: not trained twice, wherever it is asked
    assert f"already trained: {out}/final" in r.stdout, r.stdout
