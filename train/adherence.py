"""`unicap adherence`: prompt adherence of Next-DiT weights, GenEval-style, judged against the synthetic answer key.

    unicap adherence --weights stage1=RUN/runs/stage1/final --weights stage3=RUN/runs/stage3/final \
        --truth RUN/heldout --out RUN/adherence --n 32 --size 64x64 --level short --language en \
        --steps 20 --cfg 4.0 --seed 0 [--solver dpm++2m --cache-threshold 0.3]

The first --n rows of the held-out set's truth (RUN/heldout/truth, in key order) give the prompts: each
row's caption at --level / --language, and its scene graph (regenerated from the row's `source` by
datagen.synth; a truth row whose caption is not what synth writes for that scene is refused). Each weights
folder draws one image per prompt (train.sample.generate; image i gets the noise of seed + i, the same for
every folder), and datagen.scene_judge checks every image against its scene: background, colour, shape,
count and position, for the attributes the prompt level states (scene_judge.LEVEL_ATTRIBUTES: short and
medium name no cells, so position is judged only at --level long). The control row "truth images" judges
the held-out images themselves, resized to the same size: it shows what the judge can see at that size.
The ceiling rows "truth images through the VAE at WxH", one per VAE and drawing size of the weights, judge the
truth images resized to the drawing size, encoded and decoded by that VAE and resized to --size: what a generator
that wrote the truth's own latents would score, the most any weights drawing through that VAE at that size can
(the tiny VAE at 64 px turns small squares and triangles into blobs: its shape ceiling there is about half).
Each weights folder draws at its training resolution (a 128 px stage at 128 x 128: drawn smaller, its VAE
loses the shapes) and its images are resized to --size, the size every row is judged at (--draw judge: drawn at
--size). The control row "<last weights>, shuffled prompts" (off with --no-control) gives the last weights folder image
i+1's prompt and judges the image against scene i: the chance level of a model that draws its usual pictures.

Sampling: --solver, --steps, --cache-threshold as `unicap sample` (train/sample.py), but off by default (Euler, no
cache: earlier results stay comparable); a threshold above 0 needs every weights folder calibrated
(`unicap calibrate-cache`). adherence.json's "sampling" records the settings and each weights' transformer
evaluations per image.

Writes OUT/adherence.json (accuracy = facts that held / facts judged, per attribute; null when none was
judged), OUT/<weights>/NNNNN.png, OUT/truth/NNNNN.png and OUT/vae-WxH/NNNNN.png, and prints the table.
Examples (both images and the verdicts) are listed for the first --examples prompts of every weights folder.
Weights are read only through train.checkpoint.load_weights (safetensors + JSON); generation runs on a GPU
when there is one (train.sample.load_for_sampling), else on the CPU.
"""

from __future__ import annotations

import argparse
import io
import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import torch
from PIL import Image

from datagen import scene_judge, synth
from datagen.shards import iter_shard, list_shards
from train.codecs import VAE
from train.run_store import local_weights
from train.sample import (
    add_sampling_arguments,
    from_images,
    generate,
    load_for_sampling,
    resolve_cache,
    sampling_of,
    to_images,
)
from train.sampler import check_settings
from unicap import runtime
from unicap.atomic import atomic_path, visible_parquet_files
from unicap.contract import caption as caption_record
from unicap.contract import checkpoint as contract

VERSION = 1
TRUTH_ROW = "truth images"
TRUTH_DIR = "truth"
# the control row (the last weights, other prompts)
CONTROL_SUFFIX, CONTROL_DIR = ", shuffled prompts", "shuffled"
VAE_ROW, VAE_DIR = "truth images through the VAE at {}x{}", "vae-{}x{}"  # a ceiling row, per drawing size
RESERVED = re.compile(rf"{TRUTH_DIR}|{CONTROL_DIR}|vae-\d+x\d+")  # output folders: no weights name
Size = tuple[int, int]  # (width, height) in pixels
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


def parse_size(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)x(\d+)", text.strip().lower())
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise ValueError(f"--size {text!r}: give WIDTHxHEIGHT in pixels, e.g. 64x64")
    return int(m.group(1)), int(m.group(2))


def parse_weights(specs: list[str]) -> dict[str, Path]:
    """NAME=FOLDER, repeated -> {name: folder}, in the order given."""
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep or not folder:
            raise ValueError(f"--weights {spec!r}: give NAME=FOLDER, e.g. stage3=runs/stage3/final")
        if not NAME.fullmatch(name) or RESERVED.fullmatch(name):
            reserved = f"{TRUTH_DIR!r}, {CONTROL_DIR!r} or vae-WxH"
            raise ValueError(f"--weights {spec!r}: a name is letters, digits, '_' and '-' (and not {reserved})")
        if name in out:
            raise ValueError(f"--weights: the name {name!r} is given twice")
        out[name] = Path(folder)
    return out


def truth_folder(path: Path) -> Path:
    """A synth output folder or its truth/ folder -> the folder of truth Parquet files."""
    folder = path / "truth" if (path / "truth").is_dir() else path
    if not visible_parquet_files(folder):
        raise FileNotFoundError(f"{path}: no truth Parquet files (give `unicap synth --out DIR`'s DIR or DIR/truth)")
    return folder


def read_prompts(truth: Path, n: int, level: str, language: str) -> list[dict]:
    """The first n truth rows (key order): {key, shard, prompt, scene}."""
    column = caption_record.caption_column(level, language)
    rows = []
    for f in visible_parquet_files(truth_folder(truth)):
        table = pq.read_table(f)
        if column not in table.column_names:
            raise ValueError(f"{f}: no {column} column (levels/languages of the truth: {table.column_names})")
        rows += table.select(["key", "shard", "source", column]).to_pylist()
    rows.sort(key=lambda r: r["key"])
    if len(rows) < n:
        raise ValueError(f"--n {n}: the truth under {truth} has only {len(rows)} rows")
    out = []
    for row in rows[:n]:
        scene = synth.scene_from_source(row["source"])
        if scene is None:
            raise ValueError(
                f"{truth}: row {row['key']} has source {row['source']!r}, not a synthetic image "
                "(synth://seed=S/index=I): only the synthetic set has an answer key"
            )
        if synth.captions(scene)[column] != row[column]:
            raise ValueError(
                f"{truth}: row {row['key']}: {column} is not what datagen.synth writes for "
                f"{row['source']}: the truth was made by another version; re-run `unicap synth`"
            )
        out.append({"key": row["key"], "shard": row["shard"], "prompt": row[column], "scene": scene})
    return out


def truth_images(truth: Path, prompts: list[dict]) -> list[Image.Image]:
    """The held-out images of the prompts, from the shards beside truth/ (rendered from the scene when the
    shards are not there: the same picture before its JPEG/PNG encoding)."""
    shards_dir = truth_folder(truth).parent
    wanted = {p["key"] for p in prompts}
    found: dict[str, bytes] = {}
    shards = set(list_shards(shards_dir)) & {p["shard"] for p in prompts}
    for shard in sorted(shards):
        for batch in iter_shard(shards_dir, shard):
            for key, image in zip(batch.column("key").to_pylist(), batch.column("image").to_pylist(), strict=True):
                if key in wanted:
                    found[key] = image
    return [
        Image.open(io.BytesIO(found[p["key"]])).convert("RGB") if p["key"] in found else synth.render(p["scene"])
        for p in prompts
    ]


def generate_all(
    folder: Path,
    prompts: list[str],
    *,
    size: tuple[int, int],
    steps: int,
    cfg: float,
    seed: int,
    batch: int,
    codecs: dict,
    device: str = "auto",
    solver: str = "euler",
    cache_threshold: float = 0.0,
) -> list[Image.Image]:
    """One image per prompt from a weights folder (EMA weights of a checkpoint folder, as `unicap sample`)."""
    weights = contract.EMA_FILE if (folder / contract.EMA_FILE).exists() else contract.MODEL_FILE
    threshold, coefficients = resolve_cache(folder, cache_threshold, 0.0)
    model, te, vae = load_for_sampling(folder, weights, device, codecs)  # folders of one run share codecs
    width, height = size
    sampling = dict(steps=steps, solver=solver, cache_threshold=threshold, cache_coefficients=coefficients)
    images: list[Image.Image] = []
    for start in range(0, len(prompts), batch):  # image i always gets the noise of seed + i
        chunk = prompts[start : start + batch]
        images += generate(
            model, te, vae, chunk, width=width, height=height, cfg_scale=cfg, seed=seed + start, **sampling
        )
    return images


def evaluations_per_image(images: list[Image.Image]) -> float:
    """The mean transformer evaluations (forwards whose block stack ran) that drew each image."""
    counts = [sampling_of(im)["evaluations"] for im in images]
    return round(sum(counts) / max(len(counts), 1), 2)


def _trained_size(state: dict, size: tuple[int, int]) -> tuple[int, int]:
    """The judging size's aspect ratio at the weights' training resolution (a 128 px stage draws at 128 x 128)."""
    res = (state.get("config") or {}).get("data", {}).get("resolution")
    if not res:
        return size
    scale = res / (size[0] * size[1]) ** 0.5
    return max(16, round(size[0] * scale / 16) * 16), max(16, round(size[1] * scale / 16) * 16)


@torch.no_grad()
def vae_round_trip(vae: VAE, images: list[Image.Image], draw: Size, size: Size, batch: int) -> list[Image.Image]:
    """Each image resized to `draw`, encoded and decoded by `vae` (on its device), then resized to `size`."""
    device = next(vae.parameters()).device
    out: list[Image.Image] = []
    for start in range(0, len(images), batch):
        drawn = [im.resize(draw, Image.Resampling.LANCZOS) for im in images[start : start + batch]]
        out += to_images(vae.decode(vae.encode(from_images(drawn, device))))
    return [im.resize(size, Image.Resampling.LANCZOS) if im.size != size else im for im in out]


def judge_row(images: list[Image.Image], prompts: list[dict], attributes) -> list[scene_judge.Judgement]:
    return [scene_judge.judge(im, p["scene"], attributes=attributes) for im, p in zip(images, prompts, strict=True)]


def accuracy(judgements: list[scene_judge.Judgement]) -> tuple[dict, dict]:
    """({attribute: facts held / facts judged, or None}, {attribute: facts judged})."""
    facts = {a: sum(j.facts[a] for j in judgements) for a in scene_judge.ATTRIBUTES}
    held = {a: sum(j.held[a] for j in judgements) for a in scene_judge.ATTRIBUTES}
    return {a: (held[a] / facts[a] if facts[a] else None) for a in scene_judge.ATTRIBUTES}, facts


def adherence(
    weights: dict[str, Path],
    truth: Path,
    out: Path,
    *,
    n: int = 32,
    size: tuple[int, int] = (64, 64),
    level: str = "short",
    language: str = "en",
    steps: int = 20,
    cfg: float = 4.0,
    seed: int = 0,
    examples: int = 8,
    batch: int = 16,
    device: str = "auto",
    control: bool = True,
    draw: str = "trained",
    solver: str = "euler",
    cache_threshold: float = 0.0,
) -> dict:
    """Generate, judge and write OUT/adherence.json (see the module doc); returns what it wrote."""
    check_settings(solver, steps, cache_threshold)
    if level not in caption_record.LEVELS or language not in caption_record.LANGUAGES:
        raise ValueError(
            f"--level {level!r} / --language {language!r}: levels {caption_record.LEVELS}, "
            f"languages {caption_record.LANGUAGES}"
        )
    if n < 1 or steps < 1 or examples < 0 or batch < 1:
        raise ValueError("--n, --steps and --batch must be positive, --examples not negative")
    draw_sizes, ceilings = {}, []
    for name, folder in weights.items():
        state = contract.read_state(folder)  # a folder that is not weights fails before anything is generated
        draw_sizes[name] = size if draw == "judge" else _trained_size(state, size)
        if (draw_sizes[name], state["vae"]) not in ceilings:
            ceilings.append((draw_sizes[name], state["vae"]))
        if not ((folder / contract.EMA_FILE).is_file() or (folder / contract.MODEL_FILE).is_file()):
            raise contract.CheckpointError(f"{name}={folder}: no {contract.EMA_FILE} or {contract.MODEL_FILE}")
    attributes = scene_judge.LEVEL_ATTRIBUTES[level]
    prompts = read_prompts(truth, n, level, language)
    texts = [p["prompt"] for p in prompts]
    out.mkdir(parents=True, exist_ok=True)

    def save(images: list[Image.Image], sub: str) -> list[str]:
        (out / sub).mkdir(exist_ok=True)
        paths = [f"{sub}/{i:05d}.png" for i in range(len(images))]
        for im, rel in zip(images, paths, strict=True):
            im.save(out / rel)
        return paths

    truth_ims = [im.resize(size, Image.Resampling.LANCZOS) for im in truth_images(truth, prompts)]
    truth_paths = save(truth_ims, TRUTH_DIR)
    rows, facts, example_list = {}, {}, []
    rows[TRUTH_ROW], facts[TRUTH_ROW] = accuracy(judge_row(truth_ims, prompts, attributes))
    if ceilings:
        originals = truth_images(truth, prompts)
        dev = runtime.resolve_device(device)
        dtype = runtime.resolve_dtype("bf16" if dev.startswith("cuda") else "fp32", dev)
        vaes = {name: VAE(name, dtype=dtype).to(dev) for _, name in ceilings}
        for (w, h), vae_name in sorted(ceilings, key=lambda c: (c[0][0] * c[0][1], c)):  # smallest first
            images = vae_round_trip(vaes[vae_name], originals, (w, h), size, batch)
            row, sub = VAE_ROW.format(w, h), VAE_DIR.format(w, h)
            if len(vaes) > 1:  # weights with different VAEs: a row for each
                row, sub = f"{row} ({vae_name})", f"{sub}-{len(rows)}"
            save(images, sub)
            rows[row], facts[row] = accuracy(judge_row(images, prompts, attributes))
    sampling = {"steps": steps, "cfg": cfg, "seed": seed, "batch": batch, "codecs": {}, "device": device}
    sampling |= {"solver": solver, "cache_threshold": cache_threshold}
    evaluations: dict[str, float] = {}

    def drawn(name: str, folder: Path, prompt_texts: list[str]) -> list[Image.Image]:
        """The weights' images of prompt_texts, drawn at their draw size and resized to the judging size."""
        images = generate_all(folder, prompt_texts, size=draw_sizes[name], **sampling)
        return [im.resize(size, Image.Resampling.LANCZOS) if im.size != size else im for im in images]

    for name, folder in weights.items():
        images = drawn(name, folder, texts)
        evaluations[name] = evaluations_per_image(images)
        paths = save(images, name)
        judgements = judge_row(images, prompts, attributes)
        rows[name], facts[name] = accuracy(judgements)
        for i in range(min(examples, n)):
            example = {"weights": name, "prompt": texts[i], "image": paths[i], "truth_image": truth_paths[i]}
            example_list.append({**example, "verdicts": judgements[i].verdicts})
    if control and weights:
        # the chance level of what the model draws anyway: the last weights given image i+1's prompt, judged
        # against image i's scene (a model that ignores its prompts scores the same here as on its own row)
        name, folder = list(weights.items())[-1]
        shifted = texts[1:] + texts[:1]
        images = drawn(name, folder, shifted)
        save(images, CONTROL_DIR)
        control_row = f"{name}{CONTROL_SUFFIX}"
        rows[control_row], facts[control_row] = accuracy(judge_row(images, prompts, attributes))
    result = {
        "version": VERSION,
        "size": list(size),
        "draw_sizes": {name: list(v) for name, v in draw_sizes.items()},
        "prompts": {"n": n, "level": level, "language": language, "truth": str(truth)},
        "attributes": list(scene_judge.ATTRIBUTES),
        "rows": rows,
        "facts": facts,
        "examples": example_list,
        "sampling": {
            "solver": solver,
            "steps": steps,
            "cache_threshold": cache_threshold,
            "cfg": cfg,
            "seed": seed,
            "batch": batch,
            "args": f"--solver {solver} --steps {steps} --cache-threshold {cache_threshold:g} --cfg {cfg:g}",
            "evaluations_per_image": evaluations,
        },
    }
    with atomic_path(out / "adherence.json") as tmp:  # in this order: the truth row first, attributes as listed
        tmp.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    return result


def table(result: dict) -> str:
    attrs = result["attributes"]
    width = max(len(r) for r in result["rows"]) + 2
    lines = [" " * width + "".join(f"{a:>12s}" for a in attrs)]
    for name, accs in result["rows"].items():
        cells = "".join(
            f"{'-':>12s}" if accs[a] is None else f"{accs[a]:>7.2f} ({result['facts'][name][a]:>2d})" for a in attrs
        )
        lines.append(f"{name:<{width}s}{cells}")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--weights",
        action="append",
        required=True,
        metavar="NAME=FOLDER",
        help="a weights folder to judge, e.g. stage3=runs/stage3/final (repeat for more)",
    )
    p.add_argument("--truth", required=True, help="the held-out synthetic set (`unicap synth --out DIR`'s DIR)")
    p.add_argument("--out", required=True, help="folder for adherence.json and the images")
    p.add_argument("--n", type=int, default=32, help="held-out prompts (the first N by key; default 32)")
    p.add_argument("--size", default="64x64", help="WIDTHxHEIGHT of the generated images (default 64x64)")
    p.add_argument("--level", default="short", choices=caption_record.LEVELS, help="caption level of the prompts")
    p.add_argument("--language", default="en", choices=caption_record.LANGUAGES, help="prompt language")
    add_sampling_arguments(p, {"solver": "euler", "steps": 20, "cache_threshold": 0.0}, "default 0: off")
    p.add_argument("--cfg", type=float, default=4.0, help="guidance scale (default 4.0)")
    p.add_argument("--seed", type=int, default=0, help="image i gets the noise of seed + i (default 0)")
    p.add_argument("--examples", type=int, default=8, help="prompts listed with images in the JSON (default 8)")
    p.add_argument("--batch", type=int, default=16, help="prompts generated at once (default 16)")
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one, bf16) | cpu | cuda | cuda:N")
    p.add_argument(
        "--draw",
        choices=("trained", "judge"),
        default="trained",
        help="trained (default): each weights draws at its training resolution, then the image is resized "
        "to --size; judge: every weights draws at --size",
    )
    p.add_argument(
        "--no-control",
        dest="control",
        action="store_false",
        help="leave out the control row (the last weights drawing another prompt's image)",
    )


def run(args: argparse.Namespace) -> int:
    weights = {name: local_weights(folder) for name, folder in parse_weights(args.weights).items()}  # URIs: downloaded
    result = adherence(
        weights,
        Path(args.truth),
        Path(args.out),
        n=args.n,
        size=parse_size(args.size),
        level=args.level,
        language=args.language,
        steps=args.steps,
        cfg=args.cfg,
        seed=args.seed,
        examples=args.examples,
        batch=args.batch,
        device=args.device,
        control=args.control,
        draw=args.draw,
        solver=args.solver,
        cache_threshold=args.cache_threshold or 0.0,
    )
    p = result["prompts"]
    print(f"adherence: {p['n']} prompts ({p['level']}, {p['language']}) at {args.size}; accuracy (facts judged):")
    print(table(result))
    print(f"adherence: {Path(args.out) / 'adherence.json'}")
    return 0


if __name__ == "__main__":
    import sys

    from unicap.cli import module_main

    sys.exit(module_main("train.adherence"))
