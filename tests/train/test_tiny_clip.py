"""The tiny CLIP trained on synthetic pairs (train.tiny_clip): scores that rank by image-text agreement.

The shipped model (models/, `make tiny-models`) is loaded the way the score job loads it (unicap.clip.ClipScorer
on its folder) and judged on scenes of a seed neither the recipe nor its own held-out check used.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from datagen import synth
from train import tiny_clip
from unicap.clip import ClipScorer

SEED, N = 4242, 48


def auc_by_column(scorer: ClipScorer) -> dict[str, float]:
    """Per caption column and overall: P(an image's true caption scores above another image's caption)."""
    scenes = [synth.make_scene(random.Random(f"{SEED}:{i}")) for i in range(N)]
    img = scorer.embed_images([synth.render(s) for s in scenes])
    caps = [synth.captions(s) for s in scenes]
    out, pos_all, neg_all = {}, [], []
    for col in sorted(caps[0]):
        txt = scorer.embed_texts([c[col] for c in caps])
        sim = img @ txt.T  # (image, caption)
        pos, neg = np.diag(sim), sim[~np.eye(N, dtype=bool)]
        out[col] = float((pos[:, None] > neg[None, :]).mean())
        pos_all.append(pos)
        neg_all.append(neg)
    pos, neg = np.concatenate(pos_all), np.concatenate(neg_all)
    out["all"] = float((pos[:, None] > neg[None, :]).mean())
    return out


@pytest.mark.timeout(600)
def test_the_shipped_clip_tells_true_captions_from_others():
    folder = tiny_clip.cached_clip()
    assert folder is not None, "no tiny CLIP in models/: run `make tiny-models`"
    trained = auc_by_column(ClipScorer(str(folder)))
    random_clip = auc_by_column(ClipScorer("tiny"))
    print(f"held-out AUC trained {trained}\nrandom {random_clip}")
    # the goal of issue 20 is 0.9 over all captions; measured: see the folder's unicap_tiny.json (heldout_auc)
    assert trained["all"] >= 0.9, trained
    assert min(trained.values()) >= 0.75, trained  # every level and language, Chinese included
    assert random_clip["all"] < 0.7, random_clip


@pytest.mark.slow  # 150 training steps
@pytest.mark.timeout(900)
def test_a_short_run_of_the_recipe_learns(tmp_path):
    """The recipe still trains: 150 steps on 256 scenes move the held-out AUC well above chance."""
    recipe = tiny_clip.with_overrides(tiny_clip.RECIPE, ["steps=150", "images=256", "heldout=64", "warmup=20"])
    folder = tiny_clip.tiny_clip(recipe, root=tmp_path)
    mark = json.loads((folder / "unicap_tiny.json").read_text())
    assert mark["final_loss"] < 0.8 * mark["first_loss"], mark
    assert mark["heldout_auc"]["all"] > 0.65, mark["heldout_auc"]
    assert (folder / "open_clip_model.safetensors").exists() and (folder / "tokenizer.json").exists()
