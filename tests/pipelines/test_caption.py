"""The captioning job on real Ray and a real vLLM engine (tiny random Qwen2-VL), offline and server."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from datagen.folder import folder_key, ingest_folder
from datagen.hostile import hostile_cases
from pipelines.caption import run_job
from tests.conftest import snapshot
from tests.pipelines.conftest import TINY_MAX_TOKENS, TINY_MAX_TOKENS_ARG, kill_tree
from tests.pipelines.standin_server import BEHAVIOURS, StandInServer
from unicap.captioner import CaptionConfig
from unicap.contract import caption as caption_record
from unicap.engines import EngineConfig

# slow: a real Ray cluster and vLLM engines and servers in every test: make test runs it, make test-fast does not
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def caption_cfg(**kw) -> CaptionConfig:
    return CaptionConfig(max_tokens=TINY_MAX_TOKENS, max_retries=0, max_pixels=112 * 112, **kw)


def read_output(out: Path) -> pd.DataFrame:
    for f in sorted(out.glob("*.parquet")):
        caption_record.validate(pq.read_table(f))
    return pd.read_parquet(out)


def test_offline_job_captions_every_key_once(ray_local, tiny_vlm, synth_shards, tmp_path):
    out = tmp_path / "captions"
    engine = EngineConfig(model=str(tiny_vlm), max_pixels=112 * 112)
    summary = run_job(synth_shards, out, engine, caption_cfg(), batch_size=8)
    df = read_output(out)
    truth = pd.read_parquet(synth_shards / "truth")
    assert sorted(df.key) == sorted(truth.key) and df.key.is_unique
    assert list(df.columns) == caption_record.caption_schema().names
    assert set(df.status) <= set(caption_record.STATUSES)
    assert (df.prompt_version == "unicap-v1").all() and (df.engine == "vllm").all()
    assert (df.num_output_tokens > 0).all()  # the engine really generated for every image
    # the random model never emits EOS within the tiny budget: every caption is recorded as truncated
    assert (df.error.str.split(":").str[0] == "truncated").all()
    assert sorted(p.stem for p in (out / "_stats").glob("*.json")) == sorted(truth.shard.unique())
    assert summary["rows"] == 24 and summary["failures_by_reason"] == {"truncated": 24}
    before = snapshot(out)
    again = run_job(synth_shards, out, EngineConfig(model=str(tiny_vlm)), caption_cfg())
    assert again["last_run"]["shards_written"] == [] and again["last_run"]["images"] == 0
    assert {k: v for k, v in snapshot(out).items() if k != "_summary.json"} == {
        k: v for k, v in before.items() if k != "_summary.json"
    }


def test_offline_and_server_engines_give_the_same_output(tiny_vlm, vllm_server, synth_shards):
    from unicap import prompts
    from unicap.captioner import decode_for_model, fit_max_pixels
    from unicap.engines import GenRequest, ServerEngine, VLLMEngine

    truth = pd.read_parquet(synth_shards / "truth").head(3)
    import tarfile

    images = []
    with tarfile.open(synth_shards / "00000.tar") as tar:
        for m in tar.getmembers():
            if m.name.endswith((".jpg", ".png")) and len(images) < 3:
                images.append(fit_max_pixels(decode_for_model(tar.extractfile(m).read(), 200704).image, 200704))
    assert len(truth) == 3 == len(images)
    reqs = [
        GenRequest(prompts.chat_messages(p, "placeholder"), im, max_tokens=16)
        for im in images
        for p in prompts.direct_prompts(["short", "tags"], ["en", "zh"])
    ]
    cfg = EngineConfig(model=str(tiny_vlm), server=vllm_server, max_pixels=200704)
    server = ServerEngine(cfg).generate(reqs)
    offline = VLLMEngine(EngineConfig(model=str(tiny_vlm), max_pixels=200704, kv_cache_bytes=64 << 20)).generate(reqs)
    assert all(r.error is None for r in server + offline), [r.error for r in server + offline]
    assert [r.text for r in server] == [r.text for r in offline]
    assert [r.num_tokens for r in server] == [r.num_tokens for r in offline] == [16] * len(reqs)


def test_server_mode_job(ray_local, tiny_vlm, vllm_server, synth_shards, tmp_path):
    out = tmp_path / "server-captions"
    cfg = EngineConfig(model=str(tiny_vlm), server=vllm_server, max_pixels=112 * 112)
    summary = run_job(synth_shards, out, cfg, caption_cfg(), batch_size=8)
    df = read_output(out)
    assert sorted(df.key) == sorted(pd.read_parquet(synth_shards / "truth").key)
    assert (df.engine == "vllm-server").all() and (df.num_output_tokens > 0).all()
    assert summary["last_run"]["engine"] == "server " + vllm_server


def _behaviour_folder(root: Path) -> dict[str, str]:
    """One image per stand-in behaviour plus the hostile image set; returns key -> behaviour."""
    root.mkdir()
    expected = {}
    for colour, behaviour in BEHAVIOURS.items():
        buf = io.BytesIO()
        Image.new("RGB", (96, 96), colour).save(buf, "PNG")
        (root / f"{behaviour}.png").write_bytes(buf.getvalue())
        expected[folder_key(f"{behaviour}.png")] = behaviour
    for c in hostile_cases():
        (root / f"hostile_{c.name}.bin.png").write_bytes(c.data)
        expected[folder_key(f"hostile_{c.name}.bin.png")] = "undecodable" if c.reason else "good"
    return expected


def test_hostile_images_and_model_outputs_are_recorded(ray_local, tmp_path):
    expected = _behaviour_folder(tmp_path / "imgs")
    ingest_folder(tmp_path / "imgs", tmp_path / "shards", shard_size=9)
    out = tmp_path / "captions"
    with StandInServer(hang_s=4.0) as standin:
        cfg = EngineConfig(model="standin-vlm", server=standin.url, timeout_s=1.0, http_retries=1)
        run_job(tmp_path / "shards", out, cfg, CaptionConfig(max_retries=1), batch_size=8)
    df = read_output(out).set_index("key")
    assert sorted(df.index) == sorted(expected)  # every image is a row, undecodable ones included
    # the reason each hostile behaviour is recorded with
    malformed = ("malformed", "null_content", "list_content", "number_content", "surrogate", "empty_body", "huge")
    reason = dict.fromkeys(malformed, "malformed_output")
    reason |= {"timeout": "timeout", "trickle": "timeout"}  # a deadline per request, not per read
    reason |= {"empty": "empty_output", "loop": "repetition_loop", "wrong_language": "wrong_language"}
    reason |= {"truncated": "truncated", "refusal": "refusal", "undecodable": "undecodable_image"}
    for key, behaviour in expected.items():
        row = df.loc[key]
        if behaviour in ("good", "flaky"):
            assert row.status == "ok", (behaviour, row.error)
            assert "纯色" in row.caption_long_zh and "square" in row.caption_long_en
        elif behaviour == "zh_wrong":
            assert row.status == "partial" and row.error.startswith("wrong_language: caption_long_zh")
            assert row.caption_short_en and row.caption_short_zh is None
        else:
            assert row.status == "failed", (behaviour, row.error)
            assert caption_record.error_reason(row.error) == reason[behaviour], (behaviour, row.error)
    assert "undecodable_image: truncated" in df.loc[folder_key("hostile_truncated_jpeg.bin.png"), "error"]
    assert df.loc[folder_key("hostile_tiny_png.bin.png"), "status"] == "ok"
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["failures_by_reason"]["timeout"] == 2 and summary["rows"] == len(expected)


def test_kill_9_mid_job_then_rerun_loses_nothing_and_duplicates_nothing(ray_local, tiny_vlm, tmp_path):
    from datagen.synth import synth

    shards = tmp_path / "shards"
    synth(str(shards), 24, seed=9, shard_size=3)  # 8 shards
    out = tmp_path / "captions"
    job = ["--input", str(shards), "--output", str(out), "--model", str(tiny_vlm), "--batch-size", "3"]
    limits = ["--max-retries", "0", "--max-pixels", str(112 * 112), "--max-tokens", TINY_MAX_TOKENS_ARG]
    cmd = [sys.executable, "-m", "pipelines.caption", *job, *limits]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    silent = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True, **silent)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not list(out.glob("*.parquet")):
            assert proc.poll() is None, "the job ended before it wrote a shard"
            time.sleep(0.2)
    finally:
        kill_tree(proc.pid)  # kill -9, the driver and its whole embedded Ray
    written_before_kill = sorted(p.stem for p in out.glob("*.parquet"))
    assert 1 <= len(written_before_kill) < 8, written_before_kill
    kept = {k: v for k, v in snapshot(out).items() if k.endswith(".parquet") and not k.startswith(".")}
    run_job(shards, out, EngineConfig(model=str(tiny_vlm), max_pixels=112 * 112), caption_cfg(), batch_size=3)
    df = read_output(out)
    assert df.key.is_unique and sorted(df.key) == sorted(pd.read_parquet(shards / "truth").key)
    after = snapshot(out)
    assert all(after[k] == v for k, v in kept.items())  # shards written before the kill: untouched
    assert not [p for p in out.rglob(".*") if p.is_file()]  # no temporaries left behind
