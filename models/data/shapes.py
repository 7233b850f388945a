"""Shapes: a deterministic synthetic image-caption world for fast, offline retrieval experiments.

Each image is a dark background with 1-3 non-overlapping coloured shapes; each caption is produced
by a small grammar that names the size, colour and shape of every object and, for two or more
objects, spatial relations between their centres ("a large red circle to the left of a small blue
square"). Five phrasings per image, with synonyms (big/large, under/below, ...), so a model has to
learn the words rather than match templates. Everything is reconstructed here, nothing is
downloaded: the same ``(split, cfg)`` always gives byte-identical pixels and captions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from xmr.models.data.base import RetrievalSplit
from xmr.models.errors import InputError


@dataclass
class ShapesConfig:
    image_size: int = 64  # small enough for a CPU CNN, large enough for 3 objects not to touch
    n_train: int = 5000
    n_val: int = 1000
    n_test: int = 1000  # 1K test images, like the Flickr30K / COCO-1K protocols
    captions_per_image: int = 5  # the VSE++/SCAN convention
    seed: int = 0  # the split index is mixed in, so splits differ for the same seed
    max_objects: int = 3  # 1..3; captions stay under ~30 words


SPLIT_INDEX = {"train": 0, "val": 1, "test": 2}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS = {  # well separated in RGB, so colour is never ambiguous to the eye (or to a CNN)
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (160, 60, 210),
    "white": (235, 235, 235),
}
COLOUR_NAMES = tuple(COLOURS)
SIZES = ("small", "large")
N_OBJECTS_P = (0.20, 0.45, 0.35)  # P(1 object), P(2), P(3)

_RADIUS = {"small": 0.09, "large": 0.16}  # of image_size: ~6 and ~10 px at 64
_SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
_REL_WORDS = {
    "left": ("to the left of", "left of", "on the left of"),
    "right": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}


@dataclass(frozen=True)
class ShapeObject:
    """One object of a scene; centre and radius in pixels."""

    shape: str
    colour: str
    size: str
    cx: float
    cy: float
    r: float


# ----------------------------------------------------------------------------- scenes


def _sample_scene(rng: np.random.Generator, cfg: ShapesConfig) -> list[ShapeObject]:
    n = 1 + int(rng.choice(len(N_OBJECTS_P), p=N_OBJECTS_P))
    n = min(n, cfg.max_objects)
    s = cfg.image_size
    while True:  # rejection sampling: restart the scene if an object finds no free spot
        objs: list[ShapeObject] = []
        for _ in range(n):
            size = SIZES[rng.integers(2)]
            r = _RADIUS[size] * s * rng.uniform(0.9, 1.1)
            for _ in range(100):
                cx, cy = rng.uniform(r + 1, s - 1 - r, size=2)
                if all(np.hypot(cx - o.cx, cy - o.cy) >= r + o.r + 2 for o in objs):
                    shape, colour = SHAPES[rng.integers(len(SHAPES))], COLOUR_NAMES[rng.integers(6)]
                    objs.append(ShapeObject(shape, colour, size, float(cx), float(cy), float(r)))
                    break
            else:
                break
        if len(objs) == n:
            return objs


def sample_scenes(split: str, cfg: ShapesConfig = ShapesConfig()) -> list[list[ShapeObject]]:
    """The scene metadata of every image of ``split`` (what ``make_shapes`` draws and describes)."""
    n = _split_size(split, cfg)
    rng = np.random.default_rng([cfg.seed, SPLIT_INDEX[split], 0])
    return [_sample_scene(rng, cfg) for _ in tqdm(range(n), desc=f"shapes {split}", disable=None)]


def _split_size(split: str, cfg: ShapesConfig) -> int:
    if split not in SPLIT_INDEX:
        raise InputError(f"unknown split {split!r}; expected one of {sorted(SPLIT_INDEX)}")
    if not 1 <= cfg.max_objects <= 3:
        raise InputError(f"max_objects is {cfg.max_objects}; expected 1, 2 or 3")
    if cfg.image_size < 16:
        raise InputError(f"image_size is {cfg.image_size}; expected at least 16 pixels")
    return {"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test}[split]


# ----------------------------------------------------------------------------- pixels


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Mask of one shape kind: offsets ``dx, dy`` (B, S, S) from centres, radius ``r`` (B, 1, 1)."""
    ax, ay = np.abs(dx), np.abs(dy)
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return np.maximum(ax, ay) <= 0.8 * r
    if shape == "triangle":  # apex up, base at 0.8 r below the centre
        return (dy <= 0.8 * r) & (ax <= (dy + r) / 1.8)
    if shape == "diamond":
        return ax + ay <= 1.1 * r
    return ((ax <= 0.33 * r) & (ay <= r)) | ((ay <= 0.33 * r) & (ax <= r))  # cross


def draw_scenes(scenes: list[list[ShapeObject]], image_size: int, seed: int | list[int] = 0) -> np.ndarray:
    """(N, S, S, 3) uint8: dark grey backgrounds with every object painted, vectorised over objects.

    Each object is rasterised in a small square window around its centre, one numpy pass per
    (object slot, shape kind); later slots are painted on top of earlier ones.
    """
    n, s = len(scenes), image_size
    rng = np.random.default_rng(seed)  # background grey levels and colour jitter
    background = rng.integers(0, 30, size=(n, 1, 1, 1))  # dark grey level per image
    images = np.broadcast_to(background, (n, s, s, 3)).astype(np.uint8)
    slots = [(i, k, o) for i, sc in enumerate(scenes) for k, o in enumerate(sc)]
    jitter = rng.integers(-15, 16, size=(len(slots), 3))  # a little colour noise per object
    w = 2 * int(np.ceil(max(_RADIUS.values()) * 1.1 * s)) + 4  # window side, covers the largest object
    v, u = np.mgrid[0:w, 0:w]  # (W, W) window rows, cols
    for k in range(max((len(sc) for sc in scenes), default=0)):
        for shape in SHAPES:
            sel = [j for j, (_, kk, o) in enumerate(slots) if kk == k and o.shape == shape]
            if not sel:
                continue
            img = np.array([slots[j][0] for j in sel], dtype=np.int64)
            cx, cy, r = (
                np.array(c, dtype=np.float32)
                for c in zip(*((o.cx, o.cy, o.r) for o in (slots[j][2] for j in sel)), strict=True)
            )
            x0 = np.floor(cx).astype(np.int64)[:, None, None] - w // 2  # (B, 1, 1) window origin
            y0 = np.floor(cy).astype(np.int64)[:, None, None] - w // 2
            px, py = x0 + u, y0 + v  # (B, W, W) pixel coordinates
            dx = px + 0.5 - cx[:, None, None]
            dy = py + 0.5 - cy[:, None, None]
            mask = _shape_mask(shape, dx, dy, r[:, None, None]) & (px >= 0) & (px < s) & (py >= 0) & (py < s)
            b, yy, xx = np.nonzero(mask)
            rgb = np.array([COLOURS[slots[j][2].colour] for j in sel]) + jitter[sel]
            images[img[b], py[b, yy, xx], px[b, yy, xx]] = np.clip(rgb, 0, 255).astype(np.uint8)[b]
    return images


# ----------------------------------------------------------------------------- captions


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[rng.integers(len(options))]


def _noun(rng: np.random.Generator, o: ShapeObject) -> str:
    """'large red circle' with a random size synonym."""
    return f"{_pick(rng, _SIZE_WORDS[o.size])} {o.colour} {o.shape}"


def _relation(rng: np.random.Generator, a: ShapeObject, b: ShapeObject) -> str:
    """Where ``a`` is relative to ``b``, by the larger of the centre offsets (image y points down)."""
    dx, dy = a.cx - b.cx, a.cy - b.cy
    if abs(dx) >= abs(dy):
        return _pick(rng, _REL_WORDS["left" if dx < 0 else "right"])
    return _pick(rng, _REL_WORDS["above" if dy < 0 else "below"])


def _location(rng: np.random.Generator, o: ShapeObject, image_size: int) -> str:
    """'in the top left corner', 'in the middle', ... from the 3x3 cell of the centre."""
    row = ("top", "middle", "bottom")[min(int(3 * o.cy / image_size), 2)]
    col = ("left", "middle", "right")[min(int(3 * o.cx / image_size), 2)]
    if row == "middle" and col == "middle":
        return _pick(rng, ("in the middle", "in the center", "in the centre"))
    if row == "middle":
        return _pick(rng, (f"on the {col}", f"on the {col} side"))
    if col == "middle":
        return _pick(rng, (f"at the {row}", f"near the {row}"))
    return _pick(rng, (f"in the {row} {col} corner", f"at the {row} {col}"))


def _caption_one(rng: np.random.Generator, a: ShapeObject, t: int, s: int) -> str:
    templates = (
        lambda: f"a {_noun(rng, a)} {_location(rng, a, s)}",
        lambda: f"there is a {_noun(rng, a)} {_location(rng, a, s)}",
        lambda: f"{_location(rng, a, s)} there is a {_noun(rng, a)}",
        lambda: f"a single {_noun(rng, a)} on a dark background",
        lambda: f"the picture shows one {_noun(rng, a)} {_location(rng, a, s)}",
        lambda: f"one {a.colour} {a.shape} that is {_pick(rng, _SIZE_WORDS[a.size])}",
    )
    return templates[t % len(templates)]()


def _caption_two(rng: np.random.Generator, a: ShapeObject, b: ShapeObject, t: int) -> str:
    templates = (
        lambda: f"a {_noun(rng, a)} {_relation(rng, a, b)} a {_noun(rng, b)}",
        lambda: f"there is a {_noun(rng, b)} {_relation(rng, b, a)} a {_noun(rng, a)}",
        lambda: f"two shapes the {_noun(rng, a)} is {_relation(rng, a, b)} the {_noun(rng, b)}",
        lambda: f"the {_noun(rng, a)} is {_relation(rng, a, b)} the {_noun(rng, b)}",
        lambda: f"an image with a {_noun(rng, a)} and a {_noun(rng, b)}",
        lambda: f"a {_noun(rng, b)} and a {_noun(rng, a)} {_relation(rng, a, b)} it",
    )
    return templates[t % len(templates)]()


def _caption_three(rng: np.random.Generator, a: ShapeObject, b: ShapeObject, c: ShapeObject, t: int) -> str:
    templates = (
        lambda: f"a {_noun(rng, a)} {_relation(rng, a, b)} a {_noun(rng, b)} and a {_noun(rng, c)}",
        lambda: f"three shapes a {_noun(rng, a)} a {_noun(rng, b)} and a {_noun(rng, c)}",
        lambda: (
            f"the {_noun(rng, a)} is {_relation(rng, a, b)} the {_noun(rng, b)} "
            f"and the {_noun(rng, c)} is {_relation(rng, c, b)} it"
        ),
        lambda: f"there is a {_noun(rng, c)} {_relation(rng, c, a)} a {_noun(rng, a)} and a {_noun(rng, b)}",
        lambda: (
            f"three objects with a {_noun(rng, b)} {_relation(rng, b, c)} a {_noun(rng, c)} "
            f"and a {_noun(rng, a)}"
        ),
        lambda: f"a {_noun(rng, a)} a {_noun(rng, b)} and a {_noun(rng, c)} on a dark background",
    )
    return templates[t % len(templates)]()


def describe(
    rng: np.random.Generator, scene: list[ShapeObject], n_captions: int, image_size: int
) -> list[str]:
    """``n_captions`` phrasings of one scene; each names the size, colour and shape of every object."""
    templates = rng.permutation(6)
    captions = []
    for j in range(n_captions):
        t = int(templates[j % 6])
        objs = [scene[i] for i in rng.permutation(len(scene))]  # who is subject varies per caption
        if len(objs) == 1:
            captions.append(_caption_one(rng, objs[0], t, image_size))
        elif len(objs) == 2:
            captions.append(_caption_two(rng, objs[0], objs[1], t))
        else:
            captions.append(_caption_three(rng, objs[0], objs[1], objs[2], t))
    return captions


# ----------------------------------------------------------------------------- the split


def make_shapes(split: str, cfg: ShapesConfig = ShapesConfig()) -> RetrievalSplit:
    """Generate one Shapes split: ``(N, S, S, 3)`` uint8 images and ``captions_per_image`` captions each."""
    scenes = sample_scenes(split, cfg)
    images = draw_scenes(scenes, cfg.image_size, seed=[cfg.seed, SPLIT_INDEX[split], 2])
    rng = np.random.default_rng([cfg.seed, SPLIT_INDEX[split], 1])
    captions = [describe(rng, sc, cfg.captions_per_image, cfg.image_size) for sc in scenes]
    return RetrievalSplit(name="shapes", split=split, images=images, captions=captions, kind="pixels")
