import re
from collections import Counter

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from scipy import ndimage

from datagen import synth
from datagen.shards import list_shards, read_index
from unicap.contract import caption as caption_record
from unicap.contract import shards
from unicap.decode import decode_image

N, SHARD = 64, 16
WORD_NUM = {w: i for i, w in enumerate(synth.EN_NUM)} | {"a": 1}
GROUP = re.compile(
    r"\b(a|one|two|three|four|five|six) (small|medium|large) (\w+) (circle|square|triangle|diamond)s?\b", re.IGNORECASE
)


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    synth.synth(str(out), N, seed=7, shard_size=SHARD)
    return out


def _tar_images(directory):
    import tarfile

    images = {}
    for tar_path in sorted(directory.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                if ext in ("jpg", "png"):
                    images[key] = tar.extractfile(m).read()
    return images


def test_same_seed_same_bytes_other_seed_other_bytes(synth_dir, tmp_path):
    again = tmp_path / "again"
    synth.synth(str(again), N, seed=7, shard_size=SHARD, processes=2)
    files = sorted(p.relative_to(synth_dir) for p in synth_dir.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        if rel.suffix != ".json":  # stats files are byte-equal too, but only tar/parquet matter
            assert (synth_dir / rel).read_bytes() == (again / rel).read_bytes(), rel
    other = tmp_path / "other"
    synth.synth(str(other), N, seed=8, shard_size=SHARD)
    assert (other / "00000.tar").read_bytes() != (synth_dir / "00000.tar").read_bytes()


def test_truth_is_valid_caption_schema_and_readable_with_pandas(synth_dir):
    for f in sorted((synth_dir / "truth").glob("*.parquet")):
        caption_record.validate(pq.read_table(f))
    assert list_shards(synth_dir) == [f"{i:05d}" for i in range(N // SHARD)]
    for shard in list_shards(synth_dir):
        shards.validate_shard(synth_dir, shard)  # the shard format's contract
    df = pd.read_parquet(synth_dir / "truth")
    assert len(df) == N and df.key.is_unique and (df.status == "ok").all()
    assert set(df.key) == set(read_index(synth_dir).key)
    cjk = re.compile(r"[\u4e00-\u9fff]")
    for col in caption_record.caption_columns():
        assert df[col].str.len().min() > 0
        assert df[col].map(lambda s: bool(cjk.search(s))).all() == col.endswith("_zh"), col
        if col.endswith("_en"):
            assert not df[col].map(lambda s: bool(cjk.search(s))).any(), col
    # a spread of sizes and aspect ratios, including >= 1024 px images for the high-res stages
    assert (df.width / df.height).round(2).nunique() >= 3
    assert (df[["width", "height"]].min(axis=1) >= 1024).any()


def _components(rgb: np.ndarray, color: tuple[int, int, int]) -> int:
    mask = np.abs(rgb.astype(int) - np.array(color)).max(axis=2) < 40
    labels, n = ndimage.label(mask)
    sizes = np.bincount(labels.ravel())[1:]
    return int((sizes >= 20).sum())  # ignore JPEG speckle


def test_captions_match_the_pixels(synth_dir):
    """Counts and colours stated in the captions are recovered from the rendered pixels."""
    df = pd.read_parquet(synth_dir / "truth").set_index("key")
    images = _tar_images(synth_dir)
    assert set(images) == set(df.index)
    for key, data in images.items():
        rgb = np.asarray(decode_image(data).image)
        stated = Counter()
        for num, _size, color, _shape in GROUP.findall(df.loc[key, "caption_medium_en"]):
            stated[color] += WORD_NUM[num.lower()]
        assert stated, df.loc[key, "caption_medium_en"]
        for color, rgb_value in ((c, v[0]) for c, v in synth.COLORS.items()):
            assert _components(rgb, rgb_value) == stated.get(color, 0), (key, color, df.loc[key, "caption_medium_en"])
        assert (df.loc[key, "width"], df.loc[key, "height"]) == (rgb.shape[1], rgb.shape[0])
        bg = synth.BACKGROUNDS[re.search(r"plain ([\w ]+?) background", df.loc[key, "caption_long_en"]).group(1)][0]
        corner = rgb[:3, :3].reshape(-1, 3).mean(axis=0)
        occupied = "top left" in df.loc[key, "caption_long_en"]
        if not occupied:
            assert np.abs(corner - np.array(bg)).max() < 12, (key, corner, bg)


def test_words_are_rendered_where_the_caption_says(synth_dir):
    df = pd.read_parquet(synth_dir / "truth").set_index("key")
    images = _tar_images(synth_dir)
    with_word = df[df.caption_long_en.str.contains('The word "')]
    without = df[~df.caption_long_en.str.contains('The word "')]
    assert len(with_word) and len(without)
    for key in list(with_word.index[:5]) + list(without.index[:5]):
        rgb = np.asarray(decode_image(images[key]).image).astype(int)
        h = rgb.shape[0]
        bottom = rgb[int(h * 0.7) :]
        ink = ((bottom.max(axis=2) < 40) | (bottom.min(axis=2) > 245)).mean()  # black or white text
        bg = synth.BACKGROUNDS[re.search(r"plain ([\w ]+?) background", df.loc[key, "caption_long_en"]).group(1)][0]
        if bg in ((250, 250, 250), (55, 55, 60)):
            continue  # the ink colour is close to the background's own: skip the crude check
        assert (ink > 0.005) == (key in with_word.index), key


def test_resume_skips_complete_shards(synth_dir, tmp_path):
    out = tmp_path / "resume"
    synth.synth(str(out), 32, seed=7, shard_size=SHARD)
    (out / "00001_stats.json").unlink()  # as if killed before shard 1 completed
    before = (out / "00000.tar").stat().st_mtime_ns
    synth.synth(str(out), 32, seed=7, shard_size=SHARD)
    assert (out / "00000.tar").stat().st_mtime_ns == before
    assert (out / "00001_stats.json").exists()
    assert len(read_index(out)) == 32
