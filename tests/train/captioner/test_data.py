"""Captioner training data: packed turns compute what the separate requests compute, as the job sends them."""

import numpy as np
import pytest
import torch

from datagen import synth
from train.captioner import config as ccfg
from train.captioner import data as cdata
from train.captioner.model import packed_loss
from unicap import eval_captions as ev
from unicap.contract import caption as caption_record

PX = 112 * 112


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2VLForConditionalGeneration

    from train.captioner.base import tiny_base

    base = tiny_base()
    tokenizer = AutoTokenizer.from_pretrained(base)
    encoder = cdata.ChatEncoder(tokenizer, AutoImageProcessor.from_pretrained(base, max_pixels=PX))
    model = Qwen2VLForConditionalGeneration.from_pretrained(base, dtype=torch.float32).eval()
    return encoder, model


def test_packed_rows_equal_the_separate_requests(tiny):
    """One row per image (shared prefix, one branch per turn) gives the loss and the 3D positions that each
    turn run alone through transformers' own forward gives (mm_token_type_ids and get_rope_index)."""
    encoder, model = tiny
    src = cdata.SynthSource(seed=3, max_pixels=PX)
    rows = [encoder.encode(src.sample(g), list(encoder.branch)) for g in range(2)]
    batch = cdata.collate(rows, encoder.pad)
    with torch.no_grad():
        packed, _ = packed_loss(model, batch)
    total, count = 0.0, 0
    for r in rows:
        assert r.columns == caption_record.caption_columns()
        for b, col in enumerate(r.columns):
            idx = [i for i, s in enumerate(r.segment) if s in (0, b + 1)]
            ids = torch.tensor([[r.input_ids[i] for i in idx]])
            # the turn alone is exactly the request the caption job makes, followed by the answer
            n_request = len(encoder.request_ids(col, r.grid_thw))
            assert ids[0, :n_request].tolist() == encoder.request_ids(col, r.grid_thw)
            answer = encoder.tokenizer(src.sample(rows.index(r)).captions[col], add_special_tokens=False)["input_ids"]
            assert ids[0, n_request:].tolist() == [*answer, encoder.end]
            mm = (ids == model.config.image_token_id).int()
            grid = torch.tensor([r.grid_thw])
            with torch.no_grad():
                logits = model(
                    input_ids=ids, pixel_values=r.pixel_values, image_grid_thw=grid, mm_token_type_ids=mm
                ).logits[0]
                positions, _ = model.model.get_rope_index(ids, mm, grid)
            assert torch.equal(positions[:, 0], torch.from_numpy(r.positions[:, idx]))
            labels = torch.tensor([r.labels[i] for i in idx])
            sel = labels != cdata.IGNORE
            assert int(sel.sum()) == len(answer) + 1  # the answer and its end token, nothing else
            total += torch.nn.functional.cross_entropy(logits[sel], labels[sel], reduction="sum").item()
            count += int(sel.sum())
    assert packed.item() == pytest.approx(total / count, rel=1e-5)


def test_branch_mask_prefix_shared_branches_private_padding_alone():
    seg = torch.tensor([[0, 0, 1, 1, 2, -1]])
    m = cdata.branch_mask(seg)[0, 0]
    assert m[3].tolist() == [True, True, True, True, False, False]  # branch 1 sees the prefix and itself
    assert m[4].tolist() == [True, True, False, False, True, False]  # branch 2 does not see branch 1
    assert m[5].tolist() == [False] * 5 + [True]  # padding: itself only
    assert not m[0, 1]  # causal


def test_synthetic_samples_are_pure_functions_of_the_index_and_canonical():
    src = cdata.SynthSource(seed=9, max_pixels=PX)
    a, b = src.sample(17), src.sample(17)
    assert a.key == b.key and a.captions == b.captions and np.array_equal(np.asarray(a.image), np.asarray(b.image))
    plain = cdata.SynthSource(seed=9, max_pixels=PX, canonical_order=False)
    for g in range(60):
        s, p = src.sample(g), plain.sample(g)
        truth = ev.Scene.from_dict(s.scene)
        assert p.captions == synth.captions(synth.scene_of(9, g))  # the answer key itself
        for col, text in s.captions.items():  # same facts, named in (colour, shape, size) order
            level, lang = caption_record.parse_caption_column(col)
            assert ev.parse(text, lang) == ev.parse(p.captions[col], lang), col
            assert (
                ev.score_caption(text, lang, truth, level).recalled
                == ev.score_caption(p.captions[col], lang, truth, level).facts
            )
    curriculum = cdata.SynthSource(seed=9, max_pixels=PX, single_group_until=40)
    assert all(
        len({(o["size"], o["color"], o["shape"]) for o in curriculum.sample(g).scene["objects"]}) == 1
        for g in range(40)
    )


def test_grounding_targets_follow_the_objects():
    s = cdata.SynthSource(seed=4, max_pixels=PX).sample(5)
    encoder_grid = (8, 8)
    t = cdata.ground_targets(s.scene, s.size, s.image.size, encoder_grid)
    assert set(cdata.GROUND_HEADS) - {"cell"} <= set(t) and "object" in t
    colours = {1 + cdata.GROUND_COLOURS.index(o["color"]) for o in s.scene["objects"]}
    assert set(t["colour"][t["colour"] > 0]) == colours
    assert (t["background"] == cdata.GROUND_BACKGROUNDS.index(s.scene["background"])).all()
    assert t["cell"].reshape(8, 8)[0, 0] == 0 and t["cell"].reshape(8, 8)[-1, -1] == 8


def test_pick_columns_and_config_checks():
    cols = caption_record.caption_columns()
    assert cdata.pick_columns(cols, 0, 1, 5) == cols
    picked = cdata.pick_columns(cols, 3, 1, 5)
    assert len(picked) == 3 and picked == cdata.pick_columns(cols, 3, 1, 5) and picked == sorted(picked, key=cols.index)
    cfg = ccfg.load("train/configs/captioner_tiny.yaml", ["data.global_batch=16", "data.micro_batch=4"])
    assert cfg.grad_accum(2) == 2 and ccfg.deepspeed_config(cfg, 2)["train_batch_size"] == 16
    with pytest.raises(ValueError, match="grounding needs the synthetic source"):
        ccfg.load(None, ["model.grounding=true", "data.source=folder", "data.captions=a", "data.shards=b"])
    with pytest.raises(ValueError, match="data.captions"):
        ccfg.load(None, ["data.source=folder"])
    with pytest.raises(ValueError, match="unknown key"):
        ccfg.load(None, ["optim.learning_rate=1"])


def test_qwen2_5_vl_packs_the_same_way(tiny):
    """Qwen2.5-VL (windowed vision tower, same 3D rope for images) runs through the same packed forward."""
    import json

    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from train.captioner.base import tiny_base

    encoder, _ = tiny
    cfg = json.loads((tiny_base() / "config.json").read_text())
    text = cfg["text_config"]
    vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=text["hidden_size"])
    vision |= dict(patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    vision |= dict(window_size=56, fullatt_block_indexes=[1])
    ids = {k: cfg[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")}
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)).eval()
    src = cdata.SynthSource(seed=3, max_pixels=PX)
    rows = [encoder.encode(src.sample(g), list(encoder.branch)[:3]) for g in range(2)]
    with torch.no_grad():
        packed, _ = packed_loss(model, cdata.collate(rows, encoder.pad))
    total, count = 0.0, 0
    for r in rows:
        for b in range(len(r.columns)):
            idx = [i for i, s in enumerate(r.segment) if s in (0, b + 1)]
            tokens = torch.tensor([[r.input_ids[i] for i in idx]])
            mm = (tokens == model.config.image_token_id).int()
            image = dict(pixel_values=r.pixel_values, image_grid_thw=torch.tensor([r.grid_thw]), mm_token_type_ids=mm)
            with torch.no_grad():
                logits = model(input_ids=tokens, **image).logits[0]
            labels = torch.tensor([r.labels[i] for i in idx])
            sel = labels != cdata.IGNORE
            total += torch.nn.functional.cross_entropy(logits[sel], labels[sel], reduction="sum").item()
            count += int(sel.sum())
    assert packed.item() == pytest.approx(total / count, rel=1e-5)
