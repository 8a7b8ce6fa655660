"""A pixel-level judge of prompt adherence on the synthetic set: does an image show the scene its prompt described?

GenEval asks an object detector whether a generated image has the prompted objects, colours, counts and
positions; the synthetic set (datagen.synth) needs no detector: its scenes are flat shapes of known palette
colours on a plain background, so the judge reads them off the pixels, deterministically:

    from datagen import synth, scene_judge
    j = scene_judge.judge(image, synth.scene_of(seed, index), attributes=scene_judge.LEVEL_ATTRIBUTES["short"])
    j.verdicts   # {"background": True, "colour": True, "shape": False, "count": True, "position": None}
    j.facts      # {"background": 1, "colour": 2, "shape": 2, "count": 2, "position": 0}

How it reads an image (`analyse`, which never sees the scene):
  * working size: an image larger than WORK_SIDE on its longer side is box-downscaled to it;
  * background: the per-channel median of a thin border ring, named by the nearest palette background;
  * pixels: each is explained as a blend of the measured background and one candidate colour (the 6 object
    colours, black and white ink, the other backgrounds): the candidate whose blend line passes nearest wins
    (from a blend weight of SOFT_MIN_WEIGHT on). Anti-aliased edges, blur and JPEG fringes are blends, so
    the edge of a red shape on white is red, not orange; text ink is a candidate, so its grey edges are ink;
  * blobs: 4-connected components of the pixels a colour wins with weight >= MIN_WEIGHT, kept when they
    can be one object: an area of MIN_AREA..MAX_AREA grid cells (the smallest true object is ~0.04), on
    the background (at least MIN_RING of the ring 3-4 px around the blob is background or its own blend:
    a coloured speck in a field of noise is not an object), moments a flat shape can have (Q_RANGE, MAX_S);
  * a blob's cell: its centroid's cell of the 3x3 grid over the image;
  * a blob's shape: from blur-invariant cumulants of its soft mass (its colour's blend weight, luma-weighted,
    within SOFT_MARGIN px; `shape_features`): s, the vertical skew, finds the triangle (its mass sits at the
    base); q, the 4th cumulants against the mass, orders square (8.33) > circle (6.33) > diamond (4.17)
    whatever the size, the aspect (a canvas squashed to a square) or the blur. Thresholds measured on true
    images (tests/datagen/test_scene_judge.py).

What it judges against the scene (`judge`): the prompt's groups, by (colour, shape) as the captions list
them, each with its number of objects and their cells. Facts per attribute:
  * background: 1 per image: the palette background nearest the border is the scene's;
  * colour: 1 per group: at least one blob of the group's colour;
  * count: 1 per group: the number of blobs of that colour equals the scene's number of objects of that
    colour (the judge counts colours, not shapes);
  * shape: 1 per group whose colour has blobs: at least min(n, blobs of that colour) of them have the
    group's shape (the drawn objects of that colour have the prompted shape);
  * position: 1 per group whose colour has blobs: at least min(n, blobs) of the group's cells hold a blob
    of that colour (as many prompted cells are filled as the drawn objects allow).
Shape and position are judged given the colour (None when the colour is absent: that is a colour error,
counted once). An attribute the prompt does not state is not judged: `LEVEL_ATTRIBUTES` lists what each
caption level states (short and medium: no positions; tags: no counts, no positions). Size and the written
word are not judged.

What it cannot do reliably (measured): the shape of small objects (~7 px) in a 64 px image once JPEG or
strong noise has touched it (JPEG q95: ~0.9-0.99 per blob, additive noise sigma 20: ~0.85); same-colour
objects that touch merge into one blob (never in true images; a generated image may); an object clipped by
the frame (the trainer's centre crop) can read as another shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from datagen.synth import BACKGROUNDS, COLORS, SynthScene

ATTRIBUTES = ("background", "colour", "shape", "count", "position")
# what each caption level of datagen.synth.captions states (sizes and the word are never judged)
LEVEL_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "long": ATTRIBUTES,
    "medium": ("background", "colour", "shape", "count"),
    "short": ("background", "colour", "shape", "count"),
    "tags": ("background", "colour", "shape"),
}
SHAPES = ("circle", "square", "triangle", "diamond")

WORK_SIDE = 256  # longer side of the working image (larger ones are box-downscaled)
BORDER = 0.03  # border ring: this fraction of the shorter side, at least 1 px
MIN_WEIGHT = 0.5  # an object pixel is at least half its colour
MAX_RESIDUAL = 70.0  # RGB distance from the background-to-colour blend line
SOFT_MIN_WEIGHT = 0.05  # a candidate explains a pixel from this blend weight on (the faint edges of a blur)
SOFT_MARGIN = 2  # ... within this many pixels of the blob
SAME_AS_BACKGROUND = 40.0  # candidates this close to the measured background are the background
MIN_AREA, MAX_AREA = 0.025, 1.5  # blob area, in grid cells (the smallest object: ~0.04)
NOISE_AREA = 0.01  # smaller components are not counted as rejected blobs either
MIN_RING = 0.6  # share of the ring 3-4 px around a blob that is background or its own colour's blend
Q_RANGE, MAX_S = (1.5, 12.0), 1.6  # moments a flat shape can have (true shapes: q 3-8.5, |s| < 1)
SHAPE_WEIGHT_CHROMA = 0.05  # a blob's soft mass weighs chroma this much against luma (JPEG halves chroma)
SHAPE_WEIGHT_MAX = 1.5  # ... and keeps overshoot (ringing) up to this, so it cancels the undershoot
TRIANGLE_S = 0.25  # |k3| / |k4|^(3/4) of the vertical marginal: triangle ~0.83, symmetric shapes 0
SQUARE_ABOVE, CIRCLE_ABOVE = 6.8, 5.2  # 1000 sqrt(k4x k4y) / mass^2: square 8.33, circle 6.33, diamond 4.17

_OBJECT_RGB = {name: np.array(rgb, dtype=np.float64) for name, (rgb, _) in COLORS.items()}
_BACKGROUND_RGB = {name: np.array(rgb, dtype=np.float64) for name, (rgb, _) in BACKGROUNDS.items()}
_NEUTRAL_RGB = {
    "ink black": np.zeros(3),
    "ink white": np.full(3, 255.0),
    **{f"bg {k}": v for k, v in _BACKGROUND_RGB.items()},
}
_YCC = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])  # JPEG's
_SHAPE_METRIC = _YCC.T @ np.diag([1.0, SHAPE_WEIGHT_CHROMA, SHAPE_WEIGHT_CHROMA]) @ _YCC


@dataclass
class Blob:
    colour: str
    area: int  # pixels of the working image
    x: float  # centroid, as a fraction of the width / height
    y: float
    cell: int  # 0..8, row-major
    shape: str
    features: dict[str, float]  # what the shape was read from (shape_features)


@dataclass
class Analysis:
    """What the judge sees in an image, without the scene."""

    size: tuple[int, int]  # working size (w, h)
    border_rgb: tuple[float, float, float]
    background: str
    blobs: list[Blob]
    rejected: int  # coloured components that are no object: too large, not on the background, no shape

    def of(self, colour: str) -> list[Blob]:
        return [b for b in self.blobs if b.colour == colour]


@dataclass
class Judgement:
    verdicts: dict[str, bool | None]  # per attribute: every fact held (None: no fact judged)
    facts: dict[str, int]  # facts judged per attribute
    held: dict[str, int]  # facts that held per attribute
    analysis: Analysis
    details: list[str] = field(default_factory=list)  # one line per fact that failed


def _working_array(image: Image.Image) -> np.ndarray:
    image = image.convert("RGB")
    scale = WORK_SIDE / max(image.size)
    if scale < 1:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BOX)
    return np.asarray(image, dtype=np.float64)


def _border_rgb(a: np.ndarray) -> np.ndarray:
    b = max(1, round(min(a.shape[:2]) * BORDER))
    top, bottom, left, right = a[:b], a[-b:], a[b:-b, :b], a[b:-b, -b:]
    ring = np.concatenate([side.reshape(-1, 3) for side in (top, bottom, left, right)])
    return np.median(ring, axis=0)


def nearest_background(rgb) -> str:
    rgb = np.asarray(rgb, dtype=np.float64)
    return min(_BACKGROUND_RGB, key=lambda k: float(np.sum((_BACKGROUND_RGB[k] - rgb) ** 2)))


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, as boolean masks, in order of their first pixel."""
    h, w = mask.shape
    if not mask.any():
        return []
    big = h * w + 1
    lab = np.where(mask, np.arange(h * w).reshape(h, w), big)
    while True:  # propagate the smallest index through each component
        p = np.pad(lab, 1, constant_values=big)
        m = np.minimum.reduce([lab, p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]])
        m = np.where(mask, m, big)
        if np.array_equal(m, lab):
            break
        lab = m
    return [lab == i for i in np.unique(lab[mask])]


def _dilate(mask: np.ndarray) -> np.ndarray:
    p = np.pad(mask, 1)
    return p[1:-1, 1:-1] | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]


def shape_features(weight: np.ndarray) -> dict[str, float]:
    """Blur-invariant moments of a soft mass: a Gaussian blur adds to the variance of each marginal and
    leaves its 3rd and 4th cumulants (k3, k4) and the mass alone. q = 1000 sqrt(k4x k4y) / mass^2 (a
    property of the shape, whatever its size, its aspect or the blur: square 1000/120, circle 1000/(16 pi^2),
    diamond 1000/240, triangle 1000/180); s = k3y / |k4y|^(3/4) (triangle -0.83, symmetric shapes 0)."""
    h, w = weight.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    m = max(float(weight.sum()), 1e-9)
    mx, my = (weight * xx).sum() / m, (weight * yy).sum() / m
    dx, dy = xx - mx, yy - my
    vx = max((weight * dx**2).sum() / m, 1e-6)
    vy = max((weight * dy**2).sum() / m, 1e-6)
    m4x, m4y = (weight * dx**4).sum() / m, (weight * dy**4).sum() / m
    k3y = (weight * dy**3).sum() / m
    k4x, k4y = m4x - 3 * vx**2, m4y - 3 * vy**2
    return {
        "mass": m,
        "q": float(np.sqrt(max(-k4x, 0.0) * max(-k4y, 0.0)) / m**2 * 1000),
        "s": float(k3y / (-k4y) ** 0.75) if k4y < 0 else 0.0,
    }


def classify_shape(f: dict[str, float]) -> str:
    if abs(f["s"]) > TRIANGLE_S:
        return "triangle"
    if f["q"] > SQUARE_ABOVE:
        return "square"
    return "circle" if f["q"] > CIRCLE_ABOVE else "diamond"


def analyse(image: Image.Image) -> Analysis:
    """Background and coloured blobs of an image (the scene is not used)."""
    a = _working_array(image)
    h, w = a.shape[:2]
    bg = _border_rgb(a)
    d = a - bg
    candidates = [(k, c, False) for k, c in _OBJECT_RGB.items()] + [(k, c, True) for k, c in _NEUTRAL_RGB.items()]
    best = np.full((h, w), np.inf)  # the residual of each pixel's best explanation
    winner = np.full((h, w), -1)  # ... and its candidate (-1: the background itself)
    winner_t = np.zeros((h, w))  # ... and its blend weight
    blend: dict[int, np.ndarray] = {}
    weights: dict[int, np.ndarray] = {}
    for i, (_, rgb, neutral) in enumerate(candidates):
        v = rgb - bg
        if float(np.linalg.norm(v)) < SAME_AS_BACKGROUND:
            continue
        t = np.clip((d @ v) / (v @ v), 0.0, 1.0)
        residual = np.linalg.norm(d - t[..., None] * v, axis=-1)
        ok = (t >= SOFT_MIN_WEIGHT) & (residual < best)
        best = np.where(ok, residual, best)
        winner = np.where(ok, i, winner)
        winner_t = np.where(ok, t, winner_t)
        if not neutral:
            blend[i] = t
            mv = _SHAPE_METRIC @ v
            weights[i] = np.clip((d @ mv) / (v @ mv), 0.0, SHAPE_WEIGHT_MAX)
    cell_area = (w / 3) * (h / 3)
    blobs: list[Blob] = []
    rejected = 0
    for i, (name, _, neutral) in enumerate(candidates):
        if neutral or i not in blend:
            continue
        explained = (winner == i) & (best < MAX_RESIDUAL)
        soft = np.where(explained, weights[i], 0.0)
        for comp in _components(explained & (blend[i] >= MIN_WEIGHT)):
            area = int(comp.sum())
            if area > MAX_AREA * cell_area or area < MIN_AREA * cell_area:
                rejected += area >= NOISE_AREA * cell_area
                continue
            region = comp
            for _ in range(SOFT_MARGIN):
                region = _dilate(region)
            ring = _dilate(_dilate(region)) & ~region
            ys, xs = np.nonzero(region)
            y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
            f = shape_features(np.where(region, np.maximum(soft, comp), 0.0)[y0:y1, x0:x1])
            f["ring"] = float(((np.linalg.norm(d[ring], axis=-1) < SAME_AS_BACKGROUND) | (winner[ring] == i)).mean())
            if f["ring"] < MIN_RING or not Q_RANGE[0] <= f["q"] <= Q_RANGE[1] or abs(f["s"]) > MAX_S:
                rejected += 1
                continue
            cy, cx = np.nonzero(comp)
            x, y = (cx.mean() + 0.5) / w, (cy.mean() + 0.5) / h
            cell = min(int(y * 3), 2) * 3 + min(int(x * 3), 2)
            blobs.append(Blob(name, area, float(x), float(y), cell, classify_shape(f), f))
    return Analysis((w, h), tuple(float(v) for v in bg), nearest_background(bg), blobs, rejected)  # type: ignore[arg-type]


def prompt_groups(scene: SynthScene) -> list[tuple[str, str, list[int]]]:
    """(colour, shape, cells) per group as the captions name them (sizes merged), first-appearance order."""
    out: dict[tuple[str, str], list[int]] = {}
    for o in scene.objects:
        out.setdefault((o.color, o.shape), []).append(o.cell)
    return [(c, s, sorted(cells)) for (c, s), cells in out.items()]


def judge(image: Image.Image, scene: SynthScene, attributes=ATTRIBUTES, analysis: Analysis | None = None) -> Judgement:
    """Per-attribute verdicts of `image` against the scene its prompt described (see the module doc)."""
    unknown = set(attributes) - set(ATTRIBUTES)
    if unknown:
        raise ValueError(f"unknown attributes {sorted(unknown)}; known: {ATTRIBUTES}")
    seen = analysis or analyse(image)
    facts = dict.fromkeys(ATTRIBUTES, 0)
    held = dict.fromkeys(ATTRIBUTES, 0)
    details: list[str] = []

    def fact(attr: str, ok: bool, what: str) -> None:
        if attr in attributes:
            facts[attr] += 1
            held[attr] += bool(ok)
            if not ok:
                details.append(f"{attr}: {what}")

    fact(
        "background",
        seen.background == scene.background,
        f"{seen.background} seen, {scene.background} prompted",
    )
    per_colour = {c: sum(o.color == c for o in scene.objects) for c in {o.color for o in scene.objects}}
    for colour, shape, cells in prompt_groups(scene):
        blobs = seen.of(colour)
        n = len(cells)
        fact("colour", bool(blobs), f"no {colour} blob")
        fact(
            "count",
            len(blobs) == per_colour[colour],
            f"{len(blobs)} {colour} blobs, {per_colour[colour]} prompted",
        )
        if not blobs:
            continue
        need = min(n, len(blobs))
        shapes = [b.shape for b in blobs]
        fact("shape", shapes.count(shape) >= need, f"{colour} blobs are {shapes}, {shape} prompted")
        filled = len(set(cells) & {b.cell for b in blobs})
        fact(
            "position",
            filled >= need,
            f"{colour} blobs in cells {sorted(b.cell for b in blobs)}, {cells} prompted",
        )
    verdicts = {a: (held[a] == facts[a]) if facts[a] else None for a in ATTRIBUTES}
    return Judgement(verdicts, facts, held, seen, details)
