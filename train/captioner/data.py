"""Captioner training data: samples (an image and its captions) -> packed chat turns, as `unicap caption` sends them.

Sources, each a pure function of a global sample index g (so a resumed run, on any number of ranks, sees
exactly what the uninterrupted run would have):
- `SynthSource`: the synthetic set made on the fly (datagen.synth, the set is infinite): image g of the
  source's seed, its exact captions and its scene graph (for the grounding targets). `canonical_order`
  lists groups by (colour, shape, size) instead of synth's drawing order: the same facts, but a target
  that is a function of the pixels alone (the evaluation does not care about order).
- `FolderSource`: a caption folder (caption records: the synthetic truth, or a stronger model's output) and
  the image shards it was made from; rows in a (seed, epoch) permutation; every caption present is a turn.

Images go through the job's own steps: `unicap.captioner.decode_for_model`, `fit_max_pixels`,
then the model's image processor. Every (level, language) caption is one chat turn built with
`unicap.prompts` (system prompt, image first, the level's instruction; the chat template of the model
folder), so the model learns to answer exactly the requests the caption job makes.

Packing: the turns of one image share their prefix (system prompt + image, up to <|vision_end|>); a row
holds the prefix once and then each turn's instruction and answer as a branch that attends to the prefix
and to itself only (`segment`: 0 prefix, b + 1 branch b, -1 padding). Positions are those each turn has
alone (Qwen2-VL's 3D rope: text t, image (s, s + row, s + col), text after the image from s + max(H, W)),
so a packed row computes exactly what the separate sequences would, with the prefix computed once.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from datagen import synth
from unicap import prompts
from unicap.captioner import decode_for_model, fit_max_pixels
from unicap.contract import caption as caption_record

IGNORE = -100
MERGE = 2  # Qwen2-VL's spatial merge: one LM image token per 2 x 2 patches of 14 px
PATCH = 14
# grounding classes (0 = none / background) in synth's vocabulary order
GROUND_COLOURS = list(synth.COLORS)
GROUND_SHAPES = list(synth.SHAPES)
GROUND_SIZES = list(synth.SIZES)
GROUND_BACKGROUNDS = list(synth.BACKGROUNDS)
GROUND_WORDS = list(synth.WORDS)
GROUND_PAIRS = [(c, s) for c in GROUND_COLOURS for s in GROUND_SHAPES]
GROUND_TRIPLES = [(z, c, s) for z in GROUND_SIZES for c, s in GROUND_PAIRS]
MAX_OBJECTS = 6  # synth draws 1-2 groups of 1-3 objects
# per image token: classes (0 = none); "image_*": the image's content as multi-hot sets (which colours, shapes,
# (colour, shape) pairs, (size, colour, shape) groups are present) and its object count, predicted from EVERY
# image token: the vision tower learns to broadcast what the image holds, which a language model can read
# before it learns where to look
GROUND_HEADS = {
    "colour": 1 + len(GROUND_COLOURS),
    "shape": 1 + len(GROUND_SHAPES),
    "size": 1 + len(GROUND_SIZES),
    "background": len(GROUND_BACKGROUNDS),
    "word": 1 + len(GROUND_WORDS),
    "cell": 9,
    "image_colours": len(GROUND_COLOURS),
    "image_shapes": len(GROUND_SHAPES),
    "image_pairs": len(GROUND_PAIRS),
    "image_triples": len(GROUND_TRIPLES),
    "image_total": 1 + MAX_OBJECTS,
}
IMAGE_SETS = ("image_colours", "image_shapes", "image_pairs", "image_triples")


@dataclass
class Sample:
    key: str
    image: Image.Image  # RGB, already fitted to the job's max_pixels
    captions: dict[str, str]  # caption column -> text (only the captions to train on)
    scene: dict | None = None  # synth.scene_dict: the grounding targets' source
    size: tuple[int, int] = (0, 0)  # the original width, height (the scene's coordinates)


def _rng(*parts) -> random.Random:
    return random.Random(int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little"))


# ---------------------------------------------------------------- sources


def canonical_scene(scene: synth.SynthScene) -> synth.SynthScene:
    """The same scene with its objects listed by (colour, shape, size, cell): synth's captions then name the
    groups in that order, a function of the pixels (synth's own order is the order it drew them in)."""
    colour, shape, size = ({k: i for i, k in enumerate(ks)} for ks in (GROUND_COLOURS, GROUND_SHAPES, GROUND_SIZES))
    objects = sorted(scene.objects, key=lambda o: (colour[o.color], shape[o.shape], size[o.size], o.cell))
    return synth.SynthScene(scene.width, scene.height, scene.background, objects, scene.text)


@dataclass
class SynthSource:
    """Synthetic images made on the fly: sample g is image g of `seed` (the held-out set uses another seed)."""

    seed: int = 1000
    max_pixels: int = 224 * 224
    canonical_order: bool = True
    single_group_until: int = 0  # curriculum: samples g < this are redrawn until they hold one group

    def __len__(self) -> int:
        return 2**62

    def sample(self, g: int) -> Sample:
        index, attempt = g, 0
        scene = synth.scene_of(self.seed, index)
        while g < self.single_group_until and len(scene.groups()) > 1:
            attempt += 1
            index = 2**40 + g * 64 + attempt  # redraws come from an index range no plain sample uses
            scene = synth.scene_of(self.seed, index)
        item, caps = synth.synth_item(self.seed, index)
        if self.canonical_order:
            caps = synth.captions(canonical_scene(scene))
        image = fit_max_pixels(decode_for_model(item.image, self.max_pixels).image, self.max_pixels)
        return Sample(item.key, image, caps, synth.scene_dict(scene), (scene.width, scene.height))


class FolderSource:
    """A caption folder and its image shards; every caption present in a row (ok or partial) is a turn."""

    def __init__(
        self,
        captions: str | Path,
        shards: str | Path,
        seed: int = 0,
        max_pixels: int = 224 * 224,
        columns: Sequence[str] | None = None,
    ):
        import tarfile

        import pyarrow.parquet as pq

        from unicap.atomic import visible_parquet_files

        files = visible_parquet_files(captions)
        if not files:
            raise ValueError(f"data.captions {captions}: no caption Parquet files")
        cols = list(columns or caption_record.caption_columns())
        self.rows: list[tuple[str, dict[str, str]]] = []
        for f in files:
            table = pq.read_table(f)
            have = [c for c in cols if c in table.schema.names]
            for r in table.select(["key", *have]).to_pylist():
                caps = {c: r[c] for c in have if isinstance(r[c], str) and r[c].strip()}
                if caps:
                    self.rows.append((r["key"], caps))
        self.members: dict[str, tuple[Path, str]] = {}
        for tar_path in sorted(Path(shards).glob("*.tar")):
            with tarfile.open(tar_path) as tar:
                for m in tar.getmembers():
                    key, _, ext = m.name.partition(".")
                    if ext.lower() in ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff"):
                        self.members[key] = (tar_path, m.name)
        self.rows = [r for r in self.rows if r[0] in self.members]
        if not self.rows:
            raise ValueError(f"no caption row of {captions} has an image in the shards of {shards}")
        self.seed, self.max_pixels = seed, max_pixels

    def __len__(self) -> int:
        return len(self.rows)

    def sample(self, g: int) -> Sample:
        epoch, i = divmod(g, len(self.rows))
        order = list(range(len(self.rows)))
        _rng(self.seed, "epoch", epoch).shuffle(order)
        key, caps = self.rows[order[i]]
        import tarfile

        tar_path, name = self.members[key]
        with tarfile.open(tar_path) as tar:
            data = tar.extractfile(name).read()
        decoded = decode_for_model(data, self.max_pixels)
        if not decoded.ok:
            raise ValueError(f"{key}: {decoded.error}")
        return Sample(key, fit_max_pixels(decoded.image, self.max_pixels), caps, None, (decoded.width, decoded.height))


# ---------------------------------------------------------------- chat turns


@dataclass
class Row:
    """One image's packed turns. Lengths: L tokens, N = image tokens, P = patches."""

    input_ids: list[int]
    labels: list[int]  # next-token targets (IGNORE outside answers and their end token)
    segment: list[int]  # 0 prefix, b + 1 branch b
    positions: np.ndarray  # (3, L) rope positions (t, h, w)
    pixel_values: torch.Tensor  # (P, 3 * 2 * 14 * 14)
    grid_thw: tuple[int, int, int]
    columns: list[str]
    ground: dict[str, np.ndarray] = field(default_factory=dict)  # head -> (N,) class per image token


class ChatEncoder:
    """Builds a sample's chat turns from `unicap.prompts` and the model's chat template and processor."""

    def __init__(
        self,
        tokenizer,
        image_processor,
        levels: Sequence[str] = caption_record.LEVELS,
        languages: Sequence[str] = caption_record.LANGUAGES,
    ):
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
        self.vision_end = tokenizer.convert_tokens_to_ids("<|vision_end|>")
        self.end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.prefix: list[int] | None = None
        self.branch: dict[str, list[int]] = {}  # column -> instruction tokens after <|vision_end|>
        for p in prompts.direct_prompts(levels, languages):
            before, after = self.prompt_pieces(p)
            if self.prefix is not None and before != self.prefix:
                raise ValueError("prompts differ before the image: the turns of an image cannot share a prefix")
            self.prefix = before
            self.branch[p.fields[0]] = after

    def prompt_pieces(self, prompt: prompts.Prompt) -> tuple[list[int], list[int]]:
        """Token ids before the image placeholder (ending with <|vision_start|>) and after it (starting
        after <|vision_end|>, ending with the assistant header), as the chat template renders the request."""
        text = self.tokenizer.apply_chat_template(
            prompts.chat_messages(prompt, "image"), tokenize=False, add_generation_prompt=True
        )
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids.count(self.image_pad) != 1:
            raise ValueError(f"the chat template renders {ids.count(self.image_pad)} image placeholders, not 1")
        i = ids.index(self.image_pad)
        if ids[i + 1] != self.vision_end:
            raise ValueError("the chat template does not close the image with <|vision_end|>")
        return ids[:i], ids[i + 2 :]

    def request_ids(self, column: str, grid_thw: Sequence[int]) -> list[int]:
        """The whole prompt of one request, image tokens expanded: what vLLM runs for this turn."""
        n = grid_thw[0] * grid_thw[1] * grid_thw[2] // MERGE**2
        return [*self.prefix, *[self.image_pad] * n, self.vision_end, *self.branch[column]]

    def pixels(self, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int, int]]:
        out = self.image_processor(images=[image], return_tensors="pt")
        return out["pixel_values"], tuple(int(v) for v in out["image_grid_thw"][0])

    def encode(self, sample: Sample, columns: Sequence[str]) -> Row:
        pixel_values, grid = self.pixels(sample.image)
        h, w = grid[1] // MERGE, grid[2] // MERGE
        n = h * w
        s = len(self.prefix)
        ids = [*self.prefix, *[self.image_pad] * n, self.vision_end]
        labels = [IGNORE] * len(ids)
        segment = [0] * len(ids)
        rows, cols = np.divmod(np.arange(n), w)
        text_after = s + max(h, w)  # the position of <|vision_end|>
        pos = [
            np.tile(np.arange(s), (3, 1)),
            np.stack([np.full(n, s), s + rows, s + cols]),
            np.full((3, 1), text_after),
        ]
        for b, col in enumerate(columns):
            answer = self.tokenizer(sample.captions[col], add_special_tokens=False)["input_ids"] + [self.end]
            branch = self.branch[col] + answer
            ids += branch
            segment += [b + 1] * len(branch)
            k = len(self.branch[col])
            # the token before each answer token predicts it; the end token is the last target
            labels += [IGNORE] * (k - 1) + answer + [IGNORE]
            pos.append(np.tile(text_after + 1 + np.arange(len(branch)), (3, 1)))
        row = Row(ids, labels, segment, np.concatenate(pos, axis=1), pixel_values, grid, list(columns))
        if sample.scene is not None:
            row.ground = ground_targets(sample.scene, sample.size, sample.image.size, (h, w))
        return row


def ground_targets(scene: dict, size: tuple[int, int], fitted: tuple[int, int], grid: tuple[int, int]) -> dict:
    """Per image token (row-major over the merged grid): the colour / shape / size class of the object
    covering most of it (0: none), the background, the word (tokens of the bottom third, when one is
    written) and the 3x3 cell its centre falls in, and which object it is labelled with (`object`, -1: none);
    per object: its colour, shape and size classes; per image (IMAGE_SETS, (1, K) multi-hot): the colours,
    shapes, pairs and groups present, and the number of objects. Boxes are in the original canvas' pixels; the processor
    resized the fitted image to the grid, so a token covers width / w x height / h of the canvas."""
    width, height = size
    h, w = grid
    tw, th = width / w, height / h
    n = h * w
    colour, shape, sz = (np.zeros(n, dtype=np.int64) for _ in range(3))
    best = np.zeros(n)
    owner = np.full(n, -1, dtype=np.int64)  # the object each token is labelled with
    r, c = np.divmod(np.arange(n), w)
    x0, y0 = c * tw, r * th
    for j, o in enumerate(scene["objects"]):
        bx0, by0, bx1, by1 = o["bbox"]
        ox = np.clip(np.minimum(x0 + tw, bx1) - np.maximum(x0, bx0), 0, None)
        oy = np.clip(np.minimum(y0 + th, by1) - np.maximum(y0, by0), 0, None)
        frac = ox * oy / (tw * th)
        take = (frac > best) & (frac >= 0.2)
        best = np.where(take, frac, best)
        owner[take] = j
        colour[take] = 1 + GROUND_COLOURS.index(o["color"])
        shape[take] = 1 + GROUND_SHAPES.index(o["shape"])
        sz[take] = 1 + GROUND_SIZES.index(o["size"])
    cx, cy = x0 + tw / 2, y0 + th / 2
    cell = np.minimum(cy * 3 // height, 2).astype(np.int64) * 3 + np.minimum(cx * 3 // width, 2).astype(np.int64)
    word = np.zeros(n, dtype=np.int64)
    if scene.get("text"):
        word[cell >= 6] = 1 + GROUND_WORDS.index(scene["text"])
    background = np.full(n, GROUND_BACKGROUNDS.index(scene["background"]), dtype=np.int64)
    sets = {k: np.zeros((1, GROUND_HEADS[k]), dtype=np.float32) for k in IMAGE_SETS}
    for o in scene["objects"]:
        sets["image_colours"][0, GROUND_COLOURS.index(o["color"])] = 1
        sets["image_shapes"][0, GROUND_SHAPES.index(o["shape"])] = 1
        sets["image_pairs"][0, GROUND_PAIRS.index((o["color"], o["shape"]))] = 1
        sets["image_triples"][0, GROUND_TRIPLES.index((o["size"], o["color"], o["shape"]))] = 1
    return {
        "colour": colour,
        "shape": shape,
        "size": sz,
        "background": background,
        "word": word,
        "cell": cell,
        **sets,
        "image_total": np.array([len(scene["objects"])], dtype=np.int64),
        "object": owner,
        **{
            f"object_{k}": np.array([1 + vocab.index(o[key]) for o in scene["objects"]], dtype=np.int64)
            for k, key, vocab in (
                ("colour", "color", GROUND_COLOURS),
                ("shape", "shape", GROUND_SHAPES),
                ("size", "size", GROUND_SIZES),
            )
        },
    }


def pick_columns(columns: Sequence[str], k: int, seed: int, g: int) -> list[str]:
    """k of the sample's caption columns (all when k <= 0 or k >= len), a pure function of (seed, g)."""
    cols = list(columns)
    if 0 < k < len(cols):
        cols = sorted(_rng(seed, "turns", g).sample(cols, k), key=cols.index)
    return cols


def collate(rows: list[Row], pad_id: int) -> dict:
    """Rows -> padded tensors: input_ids, labels, segment (B, L); positions (3, B, L); pixel_values (sum P, D);
    image_grid_thw (B, 3); ground head -> (sum N,) when every row has grounding targets."""
    length = max(len(r.input_ids) for r in rows)
    cpu = torch.device("cpu")  # a loader batch, moved by the trainer step
    b = len(rows)
    input_ids = torch.full((b, length), pad_id, dtype=torch.long, device=cpu)
    labels = torch.full((b, length), IGNORE, dtype=torch.long, device=cpu)
    segment = torch.full((b, length), -1, dtype=torch.long, device=cpu)
    positions = torch.zeros((3, b, length), dtype=torch.long, device=cpu)
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        input_ids[i, :n] = torch.tensor(r.input_ids, device=cpu)
        labels[i, :n] = torch.tensor(r.labels, device=cpu)
        segment[i, :n] = torch.tensor(r.segment, device=cpu)
        positions[:, i, :n] = torch.from_numpy(r.positions)
    out = {
        "input_ids": input_ids,
        "labels": labels,
        "segment": segment,
        "positions": positions,
        "pixel_values": torch.cat([r.pixel_values for r in rows]),
        "image_grid_thw": torch.tensor([r.grid_thw for r in rows], dtype=torch.long, device=cpu),
    }
    if rows and all(r.ground for r in rows):
        ground = {k: [r.ground[k] for r in rows] for k in rows[0].ground}
        offsets = np.cumsum([0] + [len(g) for g in ground["object_shape"][:-1]])
        ground["object"] = [np.where(o >= 0, o + off, -1) for o, off in zip(ground["object"], offsets, strict=True)]
        out["ground"] = {k: torch.from_numpy(np.concatenate(v)) for k, v in ground.items()}
    return out


def branch_mask(segment: torch.Tensor) -> torch.Tensor:
    """(B, L) segments -> (B, 1, L, L) boolean attention mask: causal; the prefix (0) is seen by every
    branch, a branch only by itself; padding (-1) attends to itself only (no empty softmax rows)."""
    q, k = segment[:, :, None], segment[:, None, :]
    length = segment.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment.device).tril()
    allowed = causal & ((k == 0) | (k == q)) & (k >= 0) & (q >= 0)
    allowed |= torch.eye(length, dtype=torch.bool, device=segment.device)
    return allowed[:, None]
