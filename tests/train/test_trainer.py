"""The DeepSpeed trainer, run for real: 2 CPU ranks (gloo), ZeRO-2/3, bf16, tiny codecs, a packed stage."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import free_port
from tests.train.conftest import ROOT, env, keys_seen, metrics, run_trainer, trainer_cmd
from unicap.contract import checkpoint as contract

pytest_plugins = ["tests.s3_server"]
pytestmark = pytest.mark.slow
REF_STEPS = 8  # 8 steps x global batch 4 = 32 samples: more than the stage's epoch, so every sample is read


@pytest.fixture(scope="module")
def reference(packed_stage, tmp_path_factory):
    """The uninterrupted run every other run is compared with: 2 ranks, ZeRO-2, bf16."""
    out = tmp_path_factory.mktemp("ref")
    overrides = [f"run.steps={REF_STEPS}", "run.log_keys=true", "run.tensorboard=true"]
    run_trainer(packed_stage, out, [*overrides, "run.sample_prompts=['a red circle']", "run.sample_steps=2"])
    return out / "stage1"


def losses(run_dir: Path) -> dict[int, float]:
    return {s: m["loss"] for s, m in metrics(run_dir).items()}


def test_run_writes_checkpoint_final_export_samples_and_logs(reference):
    final = reference / contract.FINAL_DIR
    state = contract.read_state(final)
    assert state["step"] == REF_STEPS and state["world_size"] == 2 and state["zero_stage"] == 2
    assert state["batches_consumed"] == REF_STEPS * 2  # global micro-batches: steps x accum 1 x 2 ranks
    for name in (contract.MODEL_FILE, contract.RAW_FILE, contract.OPTIMIZER_FILE):
        assert (final / name).is_file()
    assert (final / contract.DIFFUSERS_DIR / "config.json").is_file()
    assert [p.name for p in contract.complete_checkpoints(reference)] == [contract.step_dir_name(REF_STEPS)]
    assert (reference / "samples" / f"{contract.step_dir_name(REF_STEPS)}.png").is_file()
    assert list((reference / "tb").glob("events.out.tfevents.*"))
    m = metrics(reference)
    assert sorted(m) == list(range(1, REF_STEPS + 1)) and all(v["finite"] for v in m.values())
    # the EMA is not the master after training, and both are finite
    ema, raw = load_file(str(final / contract.MODEL_FILE)), load_file(str(final / contract.RAW_FILE))
    assert ema.keys() == raw.keys()
    assert any(not torch.equal(ema[k], raw[k]) for k in ema)
    assert all(torch.isfinite(v).all() for v in raw.values())


def test_an_unreadable_image_is_skipped_and_counted(reference):
    """The fixture corrupted one packed image: the run finished, and counted it."""
    state = contract.read_state(reference / contract.FINAL_DIR)
    assert state["skipped_samples"] >= 1
    # a bucket's last batch of an epoch may be smaller than micro_batch: at most the global batch per step
    assert 0 < state["samples_seen"] + state["skipped_samples"] <= REF_STEPS * 4


def test_export_loads_in_diffusers_and_matches(reference):
    from diffusers import Lumina2Transformer2DModel

    from train.checkpoint import load_weights

    ours, _ = load_weights(reference / contract.FINAL_DIR)
    ref = Lumina2Transformer2DModel.from_pretrained(reference / contract.FINAL_DIR / contract.DIFFUSERS_DIR).eval()
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 16, 8, 8, generator=g), torch.rand(2, generator=g)
    cap, mask = torch.randn(2, 6, ours.cfg.cap_feat_dim, generator=g), torch.tensor([[1] * 6, [1] * 3 + [0] * 3]).bool()
    with torch.no_grad():
        a, b = ours(x, t, cap, mask), ref(x, t, cap, mask, return_dict=False)[0]
    assert ((a - b).abs().max() / b.abs().max()) < 1e-5


def test_stage2_starts_from_stage1_and_stage3_refuses_without_stage2(reference, packed_stage, tmp_path, capsys):
    from train.trainer import main

    out = reference.parent
    # stage2 with lr 0: its weights are stage1's final master weights, bit for bit
    run_trainer(packed_stage, out, ["run.stage=stage2", "run.init_from=auto", "run.steps=1", "optim.lr=0"])
    s1 = load_file(str(out / "stage1" / contract.FINAL_DIR / contract.RAW_FILE))
    s2 = load_file(str(out / "stage2" / contract.FINAL_DIR / contract.RAW_FILE))
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    # stage3 in a folder without stage2: refused with a message, before any rank starts
    rc = main(["--config", "train/configs/stage3_cpu.yaml", f"data.packed={packed_stage}", f"run.out={tmp_path}"])
    err = capsys.readouterr().err
    assert rc == 2 and "stage2's final weights" in err and "make stage2" in err, err


def test_a_finished_stage_is_not_trained_again(reference, packed_stage):
    before = (reference / contract.FINAL_DIR / contract.STATE_FILE).stat().st_mtime_ns
    r = run_trainer(packed_stage, reference.parent, [f"run.steps={REF_STEPS}"])
    assert "already trained" in r.stdout
    assert (reference / contract.FINAL_DIR / contract.STATE_FILE).stat().st_mtime_ns == before


def test_zero3_gives_the_losses_of_zero2(reference, packed_stage, tmp_path):
    run_trainer(packed_stage, tmp_path, [f"run.steps={REF_STEPS}", "deepspeed.zero_stage=3"])
    z2, z3 = losses(reference), losses(tmp_path / "stage1")
    assert z3[1] == pytest.approx(z2[1], rel=1e-6)  # same initial weights, same batch
    for s in range(2, REF_STEPS + 1):  # bf16 weights updated through differently sharded reductions
        assert z3[s] == pytest.approx(z2[s], rel=1e-4), (s, z2, z3)  # measured: 1e-5
    # (weights: Adam turns tiny gradient differences of near-zero entries into lr-sized steps, so the
    # master weights differ by up to ~lr x steps; the EMA's sharding is checked exactly below)


def _sigterm_at(cmd: list[str], run_dir: Path, step: int) -> int:
    """Start a run, SIGTERM its ranks once `step` is logged (as a scheduler would), return the exit code."""
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if (run_dir / "metrics.jsonl").exists() and max(metrics(run_dir), default=0) >= step:
            for child in psutil.Process(proc.pid).children():
                child.send_signal(signal.SIGTERM)
            break
        time.sleep(0.2)
    out, _ = proc.communicate(timeout=300)
    assert "stopped by signal" in out, out[-3000:]
    return proc.returncode


def test_sigterm_then_resume_on_the_same_and_another_world_size(reference, packed_stage, tmp_path):
    out = tmp_path / "a"
    cmd = trainer_cmd(packed_stage, out, [f"run.steps={REF_STEPS}", "run.log_keys=true"])
    assert _sigterm_at(cmd, out / "stage1", 2) == 0
    stopped = contract.latest_checkpoint(out / "stage1")
    assert stopped is not None and 2 <= contract.read_state(stopped)["step"] < REF_STEPS
    shutil.copytree(out, tmp_path / "b")  # the same stopped run, resumed on 1 rank below

    ref_losses, ref_keys = losses(reference), Counter(keys_seen(reference))
    run_trainer(packed_stage, out, [f"run.steps={REF_STEPS}", "run.log_keys=true"])
    resumed = losses(out / "stage1")
    assert sorted(resumed) == list(range(1, REF_STEPS + 1))
    for s in range(1, REF_STEPS + 1):
        assert resumed[s] == pytest.approx(ref_losses[s], rel=1e-5, abs=1e-7), (s, resumed, ref_losses)
    assert Counter(keys_seen(out / "stage1")) == ref_keys  # every sample exactly as often as uninterrupted

    # 1 rank, global batch 4 = micro 2 x accum 2: the same samples; losses equal up to reduction order
    run_trainer(packed_stage, tmp_path / "b", [f"run.steps={REF_STEPS}", "run.log_keys=true"], nproc=1)
    other = losses(tmp_path / "b" / "stage1")
    assert Counter(keys_seen(tmp_path / "b" / "stage1")) == ref_keys
    for s in range(1, REF_STEPS + 1):
        assert other[s] == pytest.approx(ref_losses[s], rel=1e-4), (s, other, ref_losses)  # measured: equal


def test_two_launchers_of_one_rank_train_like_one_launcher_of_two(reference, packed_stage, tmp_path):
    """What a hostfile does: one launcher per node meeting at a rendezvous (here both on 127.0.0.1)."""
    port = free_port()
    steps = [f"run.steps={REF_STEPS}"]
    cmds = [trainer_cmd(packed_stage, tmp_path, steps, nproc=1, nnodes=2, node_rank=i, port=port) for i in (0, 1)]
    procs = [
        subprocess.Popen(c, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
        for c in cmds
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[-2000:] for o in outs]
    two_nodes, ref = losses(tmp_path / "stage1"), losses(reference)
    for s in range(1, REF_STEPS + 1):
        assert two_nodes[s] == pytest.approx(ref[s], rel=1e-5, abs=1e-7), (s, two_nodes, ref)


def _torchrun(nproc: int, *args: str) -> list[str]:
    """torchrun of `args` (a script and its arguments) on nproc local ranks, at a free port."""
    rendezvous = ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    return [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(nproc), *rendezvous, *args]


NAN_SCRIPT = r"""
import sys, torch, deepspeed
from train import trainer, zero
from unicap import distributed
from train.config import load, deepspeed_config
overrides = ["model.vae=tiny", "data.latent_cache_mb=0", "data.micro_batch=2", "data.global_batch=2"]
cfg = load("train/configs/stage1_cpu.yaml", [*overrides, f"data.packed={sys.argv[1]}"])
distributed.init("cpu")
codecs = trainer.load_codecs(cfg, "cpu")
model = trainer.build_model(cfg, codecs.text.dim)
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=deepspeed_config(cfg, 1))
guard = trainer.GradGuard(engine.module)
params = zero.trainable(engine.module)
def snapshot():
    return [zero.full_master(p).clone() for _, p in params], [p.detach().clone() for _, p in params]
good = {"images": torch.rand(2, 3, 64, 64) * 2 - 1, "captions": ["a red circle", ""], "keys": ["a", "b"], "g": 0}
bad = {**good, "images": torch.full((2, 3, 64, 64), float("nan")), "g": 1}
m0, w0 = snapshot()
r = trainer.train_step(engine, codecs, [bad], cfg, "cpu", guard)
m1, w1 = snapshot()
assert not r.finite, r
assert all(torch.equal(a, b) for a, b in zip(m0, m1)), "master weights changed on a skipped step"
assert all(torch.equal(a, b) for a, b in zip(w0, w1)), "bf16 weights changed on a skipped step"
assert all(torch.isfinite(zero.full_optimizer_state(p, "exp_avg")).all() for _, p in params)
r = trainer.train_step(engine, codecs, [good], cfg, "cpu", guard)
m2, _ = snapshot()
assert r.finite and r.loss == r.loss, r
assert any(not torch.equal(a, b) for a, b in zip(m1, m2)), "a good step must update the weights"
print("NAN-OK")
"""


def test_a_non_finite_loss_skips_the_step_without_touching_the_weights(packed_stage, tmp_path):
    script = tmp_path / "nan_step.py"
    script.write_text(NAN_SCRIPT)
    cmd = _torchrun(1, str(script), str(packed_stage))
    r = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0 and "NAN-OK" in r.stdout, (r.stdout[-2000:], r.stderr[-4000:])


EMA_SCRIPT = r"""
import sys, torch, deepspeed
from train import trainer, zero
from unicap import distributed
from train.config import load, deepspeed_config
from train.ema import ShardedEMA, ema_decay
stage = int(sys.argv[2])
overrides = ["model.vae=tiny", "data.latent_cache_mb=0", "data.micro_batch=2", "data.global_batch=4"]
cfg = load("train/configs/stage1_cpu.yaml", [*overrides, f"data.packed={sys.argv[1]}", f"deepspeed.zero_stage={stage}"])
_, world = distributed.init("cpu")
codecs = trainer.load_codecs(cfg, "cpu")
model = trainer.build_model(cfg, codecs.text.dim)
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=deepspeed_config(cfg, world))
guard, ema = trainer.GradGuard(engine.module), ShardedEMA(engine.module, decay=0.9)
params = zero.trainable(engine.module)
reference = {n: zero.full_master(p) for n, p in params}  # a full, unsharded EMA kept beside it
g = torch.Generator().manual_seed(torch.distributed.get_rank())
for step in range(1, 4):
    batch = {"images": torch.rand(2, 3, 64, 64, generator=g) * 2 - 1, "captions": ["a red circle", "两个方块"],
             "keys": ["a", "b"], "g": step}
    assert trainer.train_step(engine, codecs, [batch], cfg, "cpu", guard).finite
    ema.update(step)
    d = ema_decay(0.9, step)
    for n, p in params:
        reference[n] = reference[n].lerp(zero.full_master(p), 1 - d)
full = ema.full_state()
worst = max(float((full[n] - reference[n]).abs().max()) for n, _ in params)
moved = max(float((full[n] - zero.full_master(p)).abs().max()) for n, p in params)
assert worst < 1e-6 and moved > 1e-4, (worst, moved)
ema.load_full_state(reference)
assert all(torch.equal(ema.full_state()[n], reference[n]) for n, _ in params)
print("EMA-OK", stage, world, worst)
"""


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_sharded_ema_equals_a_full_ema(packed_stage, tmp_path, zero_stage):
    script = tmp_path / "ema.py"
    script.write_text(EMA_SCRIPT)
    cmd = _torchrun(2, str(script), str(packed_stage), str(zero_stage))
    r = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0 and "EMA-OK" in r.stdout, (r.stdout[-2000:], r.stderr[-4000:])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), None])
def test_the_grad_guard_flags_and_zeroes_a_non_finite_entry(bad):
    from train.trainer import GradGuard

    layer = torch.nn.Linear(3, 2)
    guard = GradGuard(layer)
    x = torch.ones(4, 3)
    if bad is not None:
        x[1, 2] = bad
    layer(x).sum().backward()
    flagged = bool(guard.take())
    assert flagged == (bad is not None) and not bool(guard.take())  # taking resets it
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())
    if bad is not None:
        assert layer.weight.grad[:, 2].eq(0).all()  # the non-finite entries were zeroed, the rest kept
        assert layer.weight.grad[:, 0].eq(4).all()


def test_a_stage_and_its_run_in_a_bucket_stop_then_resume_on_one_rank_on_an_empty_node(
    reference, packed_stage, s3, tmp_path, monkeypatch
):
    """No shared disk: the packed stage and the run folder in a bucket, a SIGTERM mid-run on 2 ranks, then the resume
    on 1 rank of "another node" (empty working copy, empty packed-file cache): the losses and the multiset of samples
    of the uninterrupted local run."""
    from train import run_store
    from unicap import storage

    packed = storage.resolve(f"{s3}/packed")
    for f in sorted(p for p in packed_stage.rglob("*") if p.is_file()):
        packed.join(f.relative_to(packed_stage).as_posix()).write_bytes(f.read_bytes())
    out, steps = f"{s3}/runs", [f"run.steps={REF_STEPS}", "run.log_keys=true"]
    nodes = {}
    for node in ("a", "b"):
        monkeypatch.setenv("UNICAP_CACHE", str(tmp_path / node))  # the node's working copy of the run folder
        nodes[node] = run_store.RunStore(out, "stage1").local
        cache = f"data.cache_dir={tmp_path / node / 'packed-cache'}"
        if node == "a":
            assert _sigterm_at(trainer_cmd(packed.uri, out, [*steps, cache]), nodes[node], 2) == 0
            stopped = contract.latest_checkpoint(storage.resolve(f"{out}/stage1"))
            assert stopped is not None and 2 <= contract.read_state(stopped)["step"] < REF_STEPS
        else:
            r = run_trainer(packed.uri, out, [*steps, cache], nproc=1)
            assert f"resuming {stopped.uri}" in r.stdout, r.stdout[-2000:]
    run = storage.resolve(f"{out}/stage1")
    got = {m["step"]: m["loss"] for m in map(json.loads, run.join("metrics.jsonl").read_text().splitlines())}
    ref = losses(reference)
    assert sorted(got) == list(range(1, REF_STEPS + 1))
    for s in range(1, REF_STEPS + 1):
        assert got[s] == pytest.approx(ref[s], rel=1e-4), (s, got, ref)  # 1 rank after 2: the reduction order
    assert Counter(keys_seen(nodes["a"]) + keys_seen(nodes["b"])) == Counter(keys_seen(reference))
    assert contract.read_state(run.join(contract.FINAL_DIR))["step"] == REF_STEPS


def test_kill_9_of_every_rank_mid_save_in_a_bucket_resumes_from_the_previous_checkpoint(
    reference, packed_stage, s3, tmp_path, monkeypatch
):
    """kill -9 of the launcher's whole process group (torchrun and both ranks) while rank 0 uploads checkpoint step 4:
    its files are in the bucket, its state.json is not (the upload is held there by run_store's test-only
    PAUSE_BEFORE_COMMIT, so that the kill lands mid-save every time). The same command again, on the same node,
    resumes from step 2, the last committed checkpoint (not from the working copy's step 4, complete on the local
    disk), and ends as the uninterrupted run: its losses, its samples and its final weights."""
    from train import run_store
    from unicap import storage

    monkeypatch.setenv("UNICAP_CACHE", str(tmp_path / "node"))  # the node's working copy of the run folder
    out, overrides = f"{s3}/runs", [f"run.steps={REF_STEPS}", "run.log_keys=true", "run.save_every=2"]
    run = storage.resolve(f"{out}/stage1")
    committed, cut = (run.join(contract.CHECKPOINTS_DIR, contract.step_dir_name(s)) for s in (2, 4))

    def names(folder) -> set[str]:
        return {f.path[len(folder.path) + 1 :] for f in folder.files(recursive=True)}

    log = tmp_path / "killed.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen(
            trainer_cmd(packed_stage, out, overrides),
            env={**env(), run_store.PAUSE_BEFORE_COMMIT: cut.name},
            stdout=sink,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,  # its own process group: torchrun and the ranks
        )
        try:
            deadline = time.time() + 600
            while not (
                committed.join(contract.STATE_FILE).is_file() and names(cut) == names(committed) - {contract.STATE_FILE}
            ):
                assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
                time.sleep(0.2)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
    assert [c.name for c in contract.complete_checkpoints(run)] == [committed.name]
    assert names(cut) and not cut.join(contract.STATE_FILE).is_file()  # uploaded, never committed
    node = run_store.RunStore(out, "stage1").local
    assert contract.latest_checkpoint(node).name == cut.name  # complete on the node's disk: the bucket decides
    killed_keys = []  # the killed run logged steps 1 to 4; those after step 2 are trained again below
    for f in sorted((node / "keys").glob("*-from0.txt")):
        killed_keys += " ".join(f.read_text().splitlines()[:2]).split()  # 1 line per step: micro 2 x accum 1 x 2

    r = run_trainer(packed_stage, out, overrides)
    assert f"resuming {committed.uri}" in r.stdout, r.stdout[-2000:]
    got = {}
    for line in run.join("metrics.jsonl").read_text().splitlines():  # the bucket's: continued from step 2
        got[json.loads(line)["step"]] = json.loads(line)["loss"]  # the last line of a step logged twice
    ref = losses(reference)
    assert sorted(got) == list(range(1, REF_STEPS + 1))
    for s in range(1, REF_STEPS + 1):
        assert got[s] == pytest.approx(ref[s], rel=1e-5, abs=1e-7), (s, got, ref)
    resumed_keys = [k for f in sorted((node / "keys").glob("*-from2.txt")) for k in f.read_text().split()]
    assert Counter(killed_keys + resumed_keys) == Counter(keys_seen(reference))
    final = run_store.local_weights(run.join(contract.FINAL_DIR))
    for name in (contract.MODEL_FILE, contract.RAW_FILE):  # the tolerance of the bucket resume test's weights
        a, b = load_file(str(reference / contract.FINAL_DIR / name)), load_file(str(final / name))
        assert a.keys() == b.keys() and all(torch.allclose(b[k], a[k], rtol=1e-5, atol=1e-7) for k in a), name
    assert [c.name for c in contract.complete_checkpoints(run)][-1] == contract.step_dir_name(REF_STEPS)
