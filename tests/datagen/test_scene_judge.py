"""The scene judge: right on the true images of the synthetic set, wrong when an image meets another scene.

The images are the shards' own bytes (JPEG or PNG as synth encodes them), the trainer's view of them at
64 and 128 px (resized and centre-cropped to the aspect-ratio bucket, JPEG as pack writes it), and the
view `train.adherence` gives its control row (squashed to 64x64). Floors sit below what was measured
(400 images of seed 7, `python -m tests.datagen.test_scene_judge`, on this branch):

    view         background colour shape  count  position      shuffled: background colour shape count position
    shard        1.000      1.000  1.000  1.000  1.000                   0.22       0.23   0.21  0.06  0.16
    128 bucket   1.000      1.000  1.000  1.000  1.000
    64 bucket    1.000      0.994  0.974  0.991  1.000     (small shapes at ~7 px after JPEG: 0.90-0.99)
    64 squash    1.000      1.000  1.000  1.000  1.000
    64 blur 1px  1.000      1.000  0.989  1.000  1.000
    64 noise 10  1.000      1.000  0.970  0.994  1.000     (the shuffled rows: all views alike)
Noise images (what an untrained model draws) pass almost nothing: colour 0-0.17, count 0-0.06.
"""

from __future__ import annotations

import dataclasses
import io
import sys

import numpy as np
import pytest
from PIL import Image, ImageFilter

from datagen import scene_judge, synth
from train.buckets import assign_bucket, bucket_table, resize_to_bucket
from unicap.contract.packed import JPEG_QUALITY

SEED, N = 7, 120
ALL = scene_judge.ATTRIBUTES
# floors (true image, its own scene) and ceilings (true image, the next image's scene), per attribute
FLOORS = {
    "shard": dict.fromkeys(ALL, 0.98),
    "bucket128": dict.fromkeys(ALL, 0.98),
    "bucket64": {**dict.fromkeys(ALL, 0.98), "shape": 0.93},
    "square64": dict.fromkeys(ALL, 0.98),
    "blur64": {**dict.fromkeys(ALL, 0.98), "shape": 0.93},
    "noise64": {**dict.fromkeys(ALL, 0.95), "shape": 0.9},
}
CEILINGS = {"background": 0.4, "colour": 0.4, "shape": 0.5, "count": 0.2, "position": 0.35}


def view(data: bytes, how: str) -> Image.Image:
    im = Image.open(io.BytesIO(data)).convert("RGB")
    if how == "shard":
        return im
    if how.startswith("bucket"):  # what the trainer sees: pack's bucket, centre crop, JPEG
        table = bucket_table(int(how[len("bucket") :]))
        im = resize_to_bucket(im, table[int(assign_bucket(im.width, im.height, table))])
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=JPEG_QUALITY)
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    square = im.resize((64, 64), Image.Resampling.LANCZOS)  # what train.adherence's truth row judges
    if how == "noise64":  # additive Gaussian noise, sigma 10 per channel
        noise = np.random.default_rng(len(data)).normal(0.0, 10.0, (64, 64, 3))
        return Image.fromarray((np.asarray(square, dtype=np.float64) + noise).clip(0, 255).astype(np.uint8))
    return square.filter(ImageFilter.GaussianBlur(1.0)) if how == "blur64" else square


def accuracy(judgements) -> dict[str, float | None]:
    facts = {a: sum(j.facts[a] for j in judgements) for a in ALL}
    return {a: sum(j.held[a] for j in judgements) / facts[a] if facts[a] else None for a in ALL}


def measure(seed: int, n: int, how: str) -> tuple[dict, dict]:
    """(accuracy on true pairs, accuracy on shuffled pairs) of the judge on `n` images of `seed`."""
    scenes = [synth.scene_of(seed, i) for i in range(n)]
    seen = [scene_judge.analyse(view(synth.synth_item(seed, i)[0].image, how)) for i in range(n)]
    true = [scene_judge.judge(None, s, analysis=a) for s, a in zip(scenes, seen, strict=True)]
    shuffled = [scene_judge.judge(None, scenes[(i + 1) % n], analysis=a) for i, a in enumerate(seen)]
    return accuracy(true), accuracy(shuffled)


@pytest.mark.parametrize("how", list(FLOORS))
def test_true_images_pass_and_shuffled_pairs_fail(how):
    true, shuffled = measure(SEED, N, how)
    print(how, "true", true, "shuffled", shuffled)
    low = {a: true[a] for a in ALL if true[a] < FLOORS[how][a]}
    assert not low, f"{how}: the judge fails true images: {low} (floors {FLOORS[how]})"
    high = {a: shuffled[a] for a in ALL if shuffled[a] > CEILINGS[a]}
    assert not high, f"{how}: the judge passes images against the wrong scene: {high} (ceilings {CEILINGS})"


@pytest.mark.parametrize("kind", ["pixels", "patches"])
def test_noise_passes_almost_nothing(kind):
    """What an untrained model draws: per-pixel noise, or 8x8 patches of random colours blown up to 64 px."""
    judgements = []
    for i in range(40):
        rng = np.random.default_rng(i)
        a = rng.uniform(0, 255, (64, 64, 3) if kind == "pixels" else (8, 8, 3)).astype(np.uint8)
        image = Image.fromarray(a).resize((64, 64), Image.Resampling.BILINEAR)
        judgements.append(scene_judge.judge(image, synth.scene_of(SEED, i)))
    acc = accuracy(judgements)
    assert acc["colour"] <= 0.3 and acc["count"] <= 0.2 and acc["background"] <= 0.4, acc


def _scene_with(scene: synth.SynthScene, **change) -> synth.SynthScene:
    """The scene with its first object changed (shape, color or cell: the bbox moves with the cell)."""
    first = scene.objects[0]
    if "cell" in change:
        cw, ch = scene.width / 3, scene.height / 3
        dx = round((change["cell"] % 3 - first.cell % 3) * cw)
        dy = round((change["cell"] // 3 - first.cell // 3) * ch)
        x0, y0, x1, y1 = first.bbox
        change["bbox"] = (x0 + dx, y0 + dy, x1 + dx, y1 + dy)
    return dataclasses.replace(scene, objects=[dataclasses.replace(first, **change), *scene.objects[1:]])


def _one_object_scene(seed: int = 11) -> synth.SynthScene:
    scenes = (synth.scene_of(seed, i) for i in range(1000))
    return next(s for s in scenes if len(s.objects) == 1 and s.objects[0].size != "small")


@pytest.mark.parametrize(
    "change, wrong",
    [
        ({"shape": "other"}, {"shape"}),
        ({"color": "other"}, {"colour", "count"}),
        ({"cell": "other"}, {"position"}),
    ],
)
def test_a_planted_error_fails_exactly_its_attribute(change, wrong):
    scene = _one_object_scene()
    first = scene.objects[0]
    key, _ = next(iter(change.items()))
    if key == "shape":
        value = next(s for s in synth.SHAPES if s != first.shape)
    elif key == "color":
        value = next(c for c in synth.COLORS if c != first.color)
    else:
        used = {o.cell for o in scene.objects}
        value = next(c for c in range(9) if c not in used and c // 3 != first.cell // 3 and c % 3 != first.cell % 3)
    drawn = _scene_with(scene, **{key: value})
    j = scene_judge.judge(synth.render(drawn).resize((64, 64), Image.Resampling.LANCZOS), scene)
    failed = {a for a, v in j.verdicts.items() if v is False}
    assert failed == wrong, (key, value, j.verdicts, j.details)
    assert all(scene_judge.judge(synth.render(scene), scene).verdicts.values())


def test_only_the_attributes_a_level_states_are_judged():
    scene = _one_object_scene()
    image = synth.render(scene)
    for level, attributes in scene_judge.LEVEL_ATTRIBUTES.items():
        j = scene_judge.judge(image, scene, attributes=attributes)
        assert {a for a, n in j.facts.items() if n} == set(attributes), level
        assert {a for a, v in j.verdicts.items() if v is None} == set(ALL) - set(attributes), level
    assert scene_judge.LEVEL_ATTRIBUTES["short"] == ("background", "colour", "shape", "count")
    with pytest.raises(ValueError, match="unknown attributes"):
        scene_judge.judge(image, scene, attributes=("size",))


def test_an_empty_canvas_has_its_background_and_nothing_else():
    scene = synth.scene_of(SEED, 0)
    blank = Image.new("RGB", (64, 64), synth.BACKGROUNDS[scene.background][0])
    j = scene_judge.judge(blank, scene)
    assert j.verdicts["background"] is True and j.verdicts["colour"] is False and j.verdicts["count"] is False
    assert j.verdicts["shape"] is None and j.verdicts["position"] is None  # judged only given the colour
    assert j.facts["colour"] == len(scene_judge.prompt_groups(scene)) and j.facts["shape"] == 0


def test_groups_follow_the_captions():
    objects = [
        synth.SynthObject("circle", "red", "small", 4, (0, 0, 1, 1)),
        synth.SynthObject("circle", "red", "large", 0, (0, 0, 1, 1)),  # another size: the same group in short
        synth.SynthObject("square", "red", "small", 8, (0, 0, 1, 1)),
    ]
    scene = synth.SynthScene(256, 256, "white", objects, None)
    assert scene_judge.prompt_groups(scene) == [("red", "circle", [0, 4]), ("red", "square", [8])]


if __name__ == "__main__":  # the table in the module doc
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 400
    for how in FLOORS:
        true, shuffled = measure(SEED, n, how)
        print(f"{how:10s} true {' '.join(f'{a} {v:.3f}' for a, v in true.items())}")
        print(f"{'':10s} shuffled {' '.join(f'{a} {v:.3f}' for a, v in shuffled.items())}")
