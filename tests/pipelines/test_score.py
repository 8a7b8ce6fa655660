"""The scoring job on a real Ray instance with real open_clip (tiny random config built offline)."""

import io
import json
import tarfile

import numpy as np
import open_clip
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from datagen.folder import folder_key, ingest_folder
from datagen.synth import synth
from pipelines.score import ScoreConfig, run_job
from tests.conftest import snapshot
from unicap.atomic import visible_parquet_files
from unicap.clip import TINY_CLIP_NAME, tiny_aesthetic_head, tiny_clip
from unicap.contract import dedup, scores
from unicap.decode import decode_image

# slow: the score job on Ray with open_clip: make test runs it, make test-fast does not
pytestmark = pytest.mark.slow


def validate_output(out) -> None:
    """Every score file, its embeddings and the duplicates table follow unicap.contract."""
    files = visible_parquet_files(out)
    assert files
    for f in files:
        table = pq.read_table(f)
        scores.validate(table)
        scores.validate_embeddings(pq.read_table(scores.embeddings_path(out, f.stem)), table)
    if dedup.duplicates_path(out).exists():
        dedup.validate(pq.read_table(dedup.duplicates_path(out)))


@pytest.fixture(scope="module")
def scored(ray_local, tmp_path_factory):
    data = tmp_path_factory.mktemp("synth")
    synth(str(data), 12, seed=2, shard_size=6)
    out = tmp_path_factory.mktemp("scores")
    head = tiny_aesthetic_head(64)
    cfg = ScoreConfig(clip="tiny", aesthetic=str(head), batch_size=8, precision="fp32", near_dedup=False)
    run_job(data, data / "truth", out, cfg)
    return data, out, head


def test_scores_equal_an_independent_open_clip_cosine(scored):
    data, out, head = scored
    validate_output(out)
    df = pd.read_parquet(out).set_index("key")
    truth = pd.read_parquet(data / "truth").set_index("key")
    assert sorted(df.index) == sorted(truth.index)
    folder = tiny_clip()
    open_clip.add_model_config(folder)
    weights = str(folder / "open_clip_model.safetensors")
    model, _, preprocess = open_clip.create_model_and_transforms(TINY_CLIP_NAME, pretrained=weights)
    tokenizer = open_clip.get_tokenizer(TINY_CLIP_NAME)
    from unicap.clip import AestheticHead

    aesthetic = AestheticHead(64).eval()
    aesthetic.load_state_dict(torch.load(head))
    with tarfile.open(data / "00000.tar") as tar:
        members = [m for m in tar.getmembers() if m.name.endswith((".jpg", ".png"))]
        images = {m.name.split(".")[0]: tar.extractfile(m).read() for m in members}
    for key, raw in images.items():
        with torch.no_grad():
            img = model.encode_image(preprocess(decode_image(raw).image)[None]).float()
            img = img / img.norm(dim=-1, keepdim=True)
            txt = model.encode_text(tokenizer([truth.loc[key, "caption_short_en"]])).float()
            txt = txt / txt.norm(dim=-1, keepdim=True)
            assert abs((img @ txt.T).item() - df.loc[key, "clip_short_en"]) < 1e-5
            assert abs(aesthetic(img).item() - df.loc[key, "aesthetic"]) < 1e-4
    assert df.clip_long_en.notna().all() and df.clip_long_zh.isna().all()  # no multilingual tower configured
    assert (df.caption_status == "ok").all() and (df.caption_levels_ok == "long,medium,short,tags").all()
    assert (df.min_side == df[["width", "height"]].min(axis=1)).all()
    emb = pd.read_parquet(out / "_embeddings")
    assert sorted(emb.key) == sorted(df.index) and len(emb.embedding.iloc[0]) == 64


def test_rerun_writes_nothing_and_a_lost_shard_is_redone(scored):
    data, out, head = scored
    before = snapshot(out)
    run_job(data, data / "truth", out, ScoreConfig(aesthetic=str(head), batch_size=8, precision="fp32", dedup=False))
    after = snapshot(out)
    assert {k: v for k, v in after.items() if not k.startswith("_")} == {
        k: v for k, v in before.items() if not k.startswith("_")
    }
    (out / "00001.parquet").unlink()  # as if killed before shard 00001 was complete
    (out / ".00001.parquet.tmp-0000dead").write_bytes(b"half")
    run_job(data, data / "truth", out, ScoreConfig(aesthetic=str(head), batch_size=8, precision="fp32", dedup=False))
    redone = snapshot(out)
    assert redone["00000.parquet"] == before["00000.parquet"] and "00001.parquet" in redone
    assert not (out / ".00001.parquet.tmp-0000dead").exists()
    assert len(pd.read_parquet(out)) == 12


def _texture(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((128, 96), Image.BICUBIC)


def _save(im: Image.Image, path, fmt="PNG", **kw):
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    path.write_bytes(buf.getvalue())


def test_planted_near_and_exact_copies_are_found(ray_local, tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(60):
        _save(_texture(i), root / f"img{i:02d}.png")
    _save(_texture(0).resize((90, 67)), root / "copy_resized.png")
    _save(_texture(1), root / "copy_jpeg.jpg", "JPEG", quality=40)
    _save(_texture(2).crop((3, 2, 125, 94)), root / "copy_cropped.png")  # ~5% cropped
    (root / "copy_exact.png").write_bytes((root / "img03.png").read_bytes())
    ingest_folder(root, tmp_path / "shards", shard_size=16)
    out = tmp_path / "scores"
    run_job(tmp_path / "shards", None, out, ScoreConfig(clip="tiny", batch_size=16, near_threshold=0.9))
    validate_output(out)
    dups = pd.read_parquet(out / "_dedup" / "duplicates.parquet")
    found = {(r.key, r.duplicate_of, r.kind) for r in dups.itertuples()}
    k = folder_key
    # the kept copy of a cluster is the one with the larger short side (the originals, or by key)
    assert (k("copy_resized.png"), k("img00.png"), "near") in found
    assert (k("copy_cropped.png"), k("img02.png"), "near") in found
    assert {k("copy_jpeg.jpg"), k("img01.png")} & {d for d, *_ in found}  # one of the pair is dropped
    exact = (k("copy_exact.png"), k("img03.png"))  # the same bytes: the smaller key is kept
    assert {(a, b) for a, b, kind in found if kind == "exact"} == {(max(exact), min(exact))}
    assert len(dups) == 4  # and nothing else: 60 unrelated textures stay apart


def test_a_shard_that_cannot_be_read_makes_the_command_exit_non_zero(ray_local, tmp_path, capsys):
    """A job that could not finish said nothing and exited 0; now the other shards are written, the
    summary and the command name the shard that failed, the exit status is 1, a re-run finishes it."""
    from unicap.cli import main as unicap

    synth(str(tmp_path / "data"), 6, seed=4, shard_size=3)
    broken = tmp_path / "data" / "00001.tar"
    saved = broken.read_bytes()
    broken.unlink()
    broken.mkdir()  # cannot be opened: the shard fails as a whole
    folders = ["--input", str(tmp_path / "data"), "--output", str(tmp_path / "out")]
    args = ["score", *folders, "--clip", "tiny", "--batch-size", "4", "--no-near-dedup"]
    assert unicap(args) == 1
    err = capsys.readouterr().err
    assert "1 of 2 shards could not be completed" in err and "00001: 3 of 3 rows never arrived" in err
    assert [p.stem for p in visible_parquet_files(tmp_path / "out")] == ["00000"]
    assert list(json.loads((tmp_path / "out" / "_summary.json").read_text())["failed_shards"]) == ["00001"]
    broken.rmdir()
    broken.write_bytes(saved)
    assert unicap(args) == 0 and len(pd.read_parquet(tmp_path / "out")) == 6
