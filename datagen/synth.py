"""The synthetic data set: images of known content and their exact captions (the answer key).

Each image is a flat illustration: 1-2 groups of identical coloured shapes (shape, colour, size,
count) placed in the cells of a 3x3 grid on a plain background, optionally a word written along
the bottom row. The truth is exact, so captions at every level and in every language follow from
it, and `DIR/truth/` holds them as caption records (unicap.contract.caption). Same seed, same bytes: every image draws
from its own `random.Random(f"{seed}:{index}")`, tar members carry fixed metadata.
The scene graph of every image is its answer key: in the shard's `{key}.json`, and regenerated from a truth
row's `source` (synth://seed=S/index=I) by `scene_from_source` (`unicap eval-captions` reads it so).

    unicap synth --out data/synth --n 64 --seed 0
    unicap synth --out s3://bucket/synth --n 64 --seed 0    # any URI unicap.storage opens
    pandas.read_parquet("data/synth/truth")
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import io
import multiprocessing
import os
import random
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

from PIL import Image, ImageDraw, ImageFont

from datagen.shards import ShardFolder, ShardItem, shard_name, write_shard
from unicap import storage
from unicap.contract import caption as caption_record
from unicap.storage import Location

TRUTH_MODEL = "synthetic-ground-truth"
TRUTH_PROMPT_VERSION = "truth-v1"
TRUTH_CREATED_AT = dt.datetime(2025, 3, 27, tzinfo=dt.UTC)  # fixed: truth files are byte-stable

# name -> (RGB, Chinese)
COLORS = {
    "red": ((215, 38, 38), "红色"),
    "green": ((34, 160, 60), "绿色"),
    "blue": ((35, 75, 215), "蓝色"),
    "yellow": ((245, 205, 25), "黄色"),
    "purple": ((135, 55, 180), "紫色"),
    "orange": ((245, 130, 25), "橙色"),
}
BACKGROUNDS = {
    "white": ((250, 250, 250), "白色"),
    "light grey": ((205, 205, 205), "浅灰色"),
    "beige": ((238, 224, 196), "米色"),
    "pale blue": ((200, 222, 245), "淡蓝色"),
    "dark grey": ((55, 55, 60), "深灰色"),
}
SHAPES = {"circle": "圆形", "square": "正方形", "triangle": "三角形", "diamond": "菱形"}
SIZES = {"small": (0.35, "小"), "medium": (0.6, "中等大小的"), "large": (0.85, "大")}
# the 3x3 grid of places, one row a line: (English, Chinese)
TOP_ROW = [("top left", "左上角"), ("top", "上方"), ("top right", "右上角")]
MIDDLE_ROW = [("left", "左侧"), ("center", "中央"), ("right", "右侧")]
BOTTOM_ROW = [("bottom left", "左下角"), ("bottom", "下方"), ("bottom right", "右下角")]
CELLS = [*TOP_ROW, *MIDDLE_ROW, *BOTTOM_ROW]  # row-major
WORDS = ["HELLO", "CAT", "SUN", "LUMINA", "OPEN", "DATA", "PIXEL", "RAY", "TREE", "MOON"]
CANVASES = [  # (width, height, weight): square, landscape, portrait; a tail of >= 1024 px images
    (256, 256, 4),
    (384, 256, 3),
    (256, 384, 3),
    (512, 512, 3),
    (640, 480, 2),
    (480, 640, 2),
    (768, 512, 1),
    (1024, 1024, 1),
    (1280, 1024, 1),
    (1024, 1536, 1),
]
EN_NUM = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
ZH_NUM = ["零", "一", "两", "三", "四", "五", "六", "七", "八", "九"]


@dataclass
class SynthObject:
    shape: str
    color: str
    size: str
    cell: int  # 0..8, row-major
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels


@dataclass
class SynthScene:
    width: int
    height: int
    background: str
    objects: list[SynthObject]
    text: str | None

    def groups(self) -> list[tuple[str, str, str, list[SynthObject]]]:
        """Objects grouped by (size, colour, shape), in first-appearance order."""
        out: dict[tuple[str, str, str], list[SynthObject]] = {}
        for o in self.objects:
            out.setdefault((o.size, o.color, o.shape), []).append(o)
        return [(*k, sorted(v, key=lambda o: o.cell)) for k, v in out.items()]


# ---------------------------------------------------------------- scenes


def make_scene(rng: random.Random) -> SynthScene:
    w, h = rng.choices([(c[0], c[1]) for c in CANVASES], weights=[c[2] for c in CANVASES])[0]
    background = rng.choice(list(BACKGROUNDS))
    text = rng.choice(WORDS) if rng.random() < 0.35 else None
    free = list(range(6 if text else 9))  # a word takes the bottom row
    rng.shuffle(free)
    objects: list[SynthObject] = []
    kinds: set[tuple[str, str, str]] = set()
    for _ in range(rng.choice([1, 1, 2])):
        kind = (rng.choice(list(SIZES)), rng.choice(list(COLORS)), rng.choice(list(SHAPES)))
        if kind in kinds:
            continue
        kinds.add(kind)
        for _ in range(rng.randint(1, 3)):
            cell = free.pop()
            objects.append(SynthObject(kind[2], kind[1], kind[0], cell, _bbox(rng, w, h, cell, kind[0])))
    return SynthScene(w, h, background, objects, text)


def _bbox(rng: random.Random, w: int, h: int, cell: int, size: str) -> tuple[int, int, int, int]:
    cw, ch = w / 3, h / 3
    side = SIZES[size][0] * min(cw, ch)
    slack_x, slack_y = (cw - side) / 2, (ch - side) / 2
    cx = (cell % 3 + 0.5) * cw + rng.uniform(-0.5, 0.5) * slack_x
    cy = (cell // 3 + 0.5) * ch + rng.uniform(-0.5, 0.5) * slack_y
    return (round(cx - side / 2), round(cy - side / 2), round(cx + side / 2), round(cy + side / 2))


def render(scene: SynthScene) -> Image.Image:
    im = Image.new("RGB", (scene.width, scene.height), BACKGROUNDS[scene.background][0])
    d = ImageDraw.Draw(im)
    for o in scene.objects:
        x0, y0, x1, y1 = o.bbox
        fill = COLORS[o.color][0]
        if o.shape == "circle":
            d.ellipse(o.bbox, fill=fill)
        elif o.shape == "square":
            d.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
        elif o.shape == "triangle":
            d.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
        else:  # diamond
            d.polygon(
                [((x0 + x1) / 2, y0), (x1, (y0 + y1) / 2), ((x0 + x1) / 2, y1), (x0, (y0 + y1) / 2)],
                fill=fill,
            )
    if scene.text:
        ink = (255, 255, 255) if scene.background == "dark grey" else (0, 0, 0)
        row_top, row_h = 2 * scene.height / 3, scene.height / 3
        size = int(min(row_h * 0.55, scene.width * 0.8 / (0.62 * len(scene.text))))
        font = ImageFont.load_default(size=max(size, 8))
        d.text((scene.width / 2, row_top + row_h / 2), scene.text, fill=ink, font=font, anchor="mm")
    return im


# ---------------------------------------------------------------- captions


def _en_group(size: str, color: str, shape: str, n: int) -> str:
    noun = shape + ("s" if n > 1 else "")
    return f"{'a' if n == 1 else EN_NUM[n]} {size} {color} {noun}"


def _zh_group(size: str, color: str, shape: str, n: int) -> str:
    return f"{ZH_NUM[n]}个{SIZES[size][1]}{COLORS[color][1]}{SHAPES[shape]}"


def _en_join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _zh_join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else "、".join(parts[:-1]) + "和" + parts[-1]


def captions(scene: SynthScene) -> dict[str, str]:
    """Exact captions at all four levels, English and Chinese, keyed by caption column name."""
    groups = scene.groups()
    n_total = len(scene.objects)
    bg_en, bg_zh = scene.background, BACKGROUNDS[scene.background][1]
    en_groups = [_en_group(s, c, sh, len(objs)) for s, c, sh, objs in groups]
    zh_groups = [_zh_group(s, c, sh, len(objs)) for s, c, sh, objs in groups]

    long_en = [
        f"A flat, minimalist digital illustration on a plain {bg_en} background.",
        f"It shows {EN_NUM[n_total]} geometric shape{'s' if n_total > 1 else ''}: {_en_join(en_groups)}.",
    ]
    long_zh = [
        f"一幅扁平、极简风格的数字插画，背景是纯{bg_zh}。",
        f"画面中有{ZH_NUM[n_total]}个几何图形：{_zh_join(zh_groups)}。",
    ]
    for s, c, sh, objs in groups:
        where_en = _en_join([f"the {CELLS[o.cell][0]}" for o in objs])
        where_zh = _zh_join([CELLS[o.cell][1] for o in objs])
        if len(objs) == 1:
            long_en.append(f"The {s} {c} {sh} is at {where_en} of the image.")
        else:
            long_en.append(f"The {s} {c} {sh}s are at {where_en} of the image.")
        long_zh.append(f"{SIZES[s][1]}{COLORS[c][1]}{SHAPES[sh]}位于画面的{where_zh}。")
    if scene.text:
        long_en.append(f'The word "{scene.text}" is written in capital letters along the bottom of the image.')
        long_zh.append(f"画面底部用大写字母写着单词“{scene.text}”。")
    long_en.append("There are no other objects, no shading and no texture.")
    long_zh.append("画面中没有其他物体，没有阴影，也没有纹理。")

    text_en = f', with the word "{scene.text}" written along the bottom' if scene.text else ""
    text_zh = f"，底部写着单词“{scene.text}”" if scene.text else ""
    medium_en = f"{_en_join(en_groups)} on a {bg_en} background{text_en}."
    medium_en = medium_en[0].upper() + medium_en[1:]
    short_en = _en_join([_en_group("", c, sh, len(o)).replace("  ", " ") for _, c, sh, o in groups])
    short_en = short_en[0].upper() + short_en[1:] + f" on {bg_en}."

    tags_en = [f"{c} {sh}" for _, c, sh, _ in groups] + [
        f"{bg_en} background",
        "flat illustration",
        "geometric shapes",
    ]
    tags_zh = [f"{COLORS[c][1]}{SHAPES[sh]}" for _, c, sh, _ in groups] + [
        f"{bg_zh}背景",
        "扁平插画",
        "几何图形",
    ]
    if scene.text:
        tags_en.append(f'text "{scene.text}"')
        tags_zh.append(f"文字“{scene.text}”")
    col = caption_record.caption_column
    return {
        col("long", "en"): " ".join(long_en),
        col("long", "zh"): "".join(long_zh),
        col("medium", "en"): medium_en,
        col("medium", "zh"): f"{bg_zh}背景上有{_zh_join(zh_groups)}{text_zh}。",
        col("short", "en"): short_en,
        col(
            "short", "zh"
        ): f"{bg_zh}背景上的{_zh_join([f'{ZH_NUM[len(o)]}个{COLORS[c][1]}{SHAPES[sh]}' for _, c, sh, o in groups])}。",
        col("tags", "en"): ", ".join(tags_en),
        col("tags", "zh"): ", ".join(tags_zh),
    }


# ---------------------------------------------------------------- shards


def synth_key(seed: int, index: int) -> str:
    return f"s{seed}_{index:08d}"


def synth_source(seed: int, index: int) -> str:
    """The `source` of a synthetic image: names the (seed, index) its scene is drawn from."""
    return f"synth://seed={seed}/index={index}"


SOURCE = re.compile(r"synth://seed=(-?\d+)/index=(\d+)")


def scene_of(seed: int, index: int) -> SynthScene:
    """The scene graph of image `index` of `seed`, without rendering it: the answer key of that image."""
    return make_scene(random.Random(f"{seed}:{index}"))


def scene_from_source(source: str) -> SynthScene | None:
    """The scene graph of a truth row by its `source` (synth://seed=S/index=I); None if not synthetic."""
    m = SOURCE.fullmatch(source or "")
    return scene_of(int(m.group(1)), int(m.group(2))) if m else None


def scene_dict(scene: SynthScene) -> dict:
    """The scene graph as plain JSON data (what the shards' {key}.json holds, plus the canvas size)."""
    return {
        "width": scene.width,
        "height": scene.height,
        "background": scene.background,
        "text": scene.text,
        "objects": [asdict(o) for o in scene.objects],
    }


def _encode(im: Image.Image, rng: random.Random) -> tuple[bytes, str]:
    buf = io.BytesIO()
    if rng.random() < 0.2:
        im.save(buf, format="PNG", optimize=False, compress_level=6)
        return buf.getvalue(), "png"
    im.save(buf, format="JPEG", quality=92)
    return buf.getvalue(), "jpg"


def synth_item(seed: int, index: int) -> tuple[ShardItem, dict[str, str]]:
    rng = random.Random(f"{seed}:{index}")
    scene = make_scene(rng)
    data, ext = _encode(render(scene), rng)
    caps = captions(scene)
    meta = {
        "background": scene.background,
        "text": scene.text,
        "objects": [asdict(o) for o in scene.objects],
    }
    item = ShardItem(
        key=synth_key(seed, index),
        source=synth_source(seed, index),
        caption=caps[caption_record.caption_column("short", "en")],
        image=data,
        ext=ext,
        width=scene.width,
        height=scene.height,
        sha256=hashlib.sha256(data).hexdigest(),
        meta=meta,
    )
    return item, caps


def write_synth_shard(out: str | os.PathLike | Location, shard_id: int, seed: int, start: int, stop: int) -> str:
    out_dir, shard = storage.resolve(out), shard_name(shard_id)
    pairs = [synth_item(seed, i) for i in range(start, stop)]
    truth = [
        {
            "key": it.key,
            "shard": shard,
            "sha256": it.sha256,
            "width": it.width,
            "height": it.height,
            "source": it.source,
            "original_caption": it.caption,
            **caps,
            "status": "ok",
            "model": TRUTH_MODEL,
            "prompt_version": TRUTH_PROMPT_VERSION,
            "engine": "synth",
            "num_output_tokens": 0,
            "created_at": TRUTH_CREATED_AT,
        }
        for it, caps in pairs
    ]
    table = caption_record.to_table(truth)
    caption_record.validate(table)
    # truth first: the shard's stats file (written last by write_shard) marks both complete
    out_dir.join("truth", f"{shard}.parquet").write_parquet(table)
    write_shard(out_dir, shard, (it for it, _ in pairs))
    return shard


def synth(
    out: str | os.PathLike | Location, n: int, seed: int = 0, shard_size: int = 1000, processes: int = 1
) -> list[str]:
    """Write `n` synthetic images as shards under `out` (a folder or a URI), truth under `out/truth`;
    resumes by shard (a shard whose stats file exists is complete, truth included)."""
    if n <= 0 or shard_size <= 0:
        raise ValueError("--n and --shard-size must be positive")
    out = storage.resolve(out)
    if not out.is_local:
        storage.check_writable(out)  # one line for a missing bucket or refused credentials
    done = set(ShardFolder(out).list())  # one listing, not a request per shard
    jobs = []
    for shard_id, start in enumerate(range(0, n, shard_size)):
        if shard_name(shard_id) not in done:
            jobs.append((out, shard_id, seed, start, min(start + shard_size, n)))
    if processes > 1 and len(jobs) > 1:
        # a forked child would inherit the parent's object-store client (threads, sockets): spawn a fresh one
        context = None if out.is_local else multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(processes, mp_context=context) as pool:
            list(pool.map(write_synth_shard, *zip(*jobs, strict=True)))
    else:
        for job in jobs:
            write_synth_shard(*job)
    return [shard_name(i) for i in range((n + shard_size - 1) // shard_size)]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder or URI (shards; ground truth in OUT/truth)")
    p.add_argument("--n", type=int, default=64, help="number of images (default 64)")
    p.add_argument("--seed", type=int, default=0, help="same seed, same bytes (default 0)")
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard (default 1000)")
    p.add_argument("--processes", type=int, default=1, help="shards rendered in parallel (default 1)")


def run(args: argparse.Namespace) -> int:
    shards = synth(args.out, args.n, args.seed, args.shard_size, args.processes)
    print(f"synth: {args.n} images in {len(shards)} shard(s) under {args.out}")
    print(f"  ground truth: pandas.read_parquet({storage.resolve(args.out).join('truth').uri!r})")
    return 0
