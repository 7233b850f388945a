"""MovingShapes: a deterministic synthetic video world for text-video and moment retrieval.

The Shapes objects (same shapes, colours, sizes and rasteriser) put in motion: each video shows 1-3
objects on a dark background; each object stays still or moves left/right/up/down during one
segment of the video, and has at most one event at a known frame: it appears, disappears or
changes colour. Colours are distinct within a video (old and new colours of a change included),
so "the red circle" always names one object, and trajectories never overlap, so every object's
pixels are its own. Every video has at least one event.

Per video there are ``captions_per_video`` whole-video descriptions (for text-video retrieval, the
MSR-VTT protocol) and ``queries_per_video`` moment queries with a ``[start, end]`` span in seconds
(for moment retrieval, the Charades-STA / QVHighlights protocol). Spans: an instantaneous event
gets a 1 s window around it, a state ("the red circle is visible") or a motion its whole extent.
Everything is reconstructed here, nothing is downloaded: the same ``(split, cfg)`` always gives
byte-identical frames and text.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from xmr.models.data.shapes import (
    _RADIUS,
    _SIZE_WORDS,
    COLOUR_NAMES,
    COLOURS,
    SHAPES,
    SIZES,
    SPLIT_INDEX,
    _pick,
    _shape_mask,
)
from xmr.models.errors import InputError


@dataclass
class MovingShapesConfig:
    image_size: int = 32  # small: video models train on CPU (2 cores); objects stay 5-11 px wide
    n_frames: int = 32  # 32 frames at 4 fps = 8 s, enough for a motion and an event to be apart
    fps: float = 4.0  # only converts frames to seconds for the query spans
    n_train: int = 2000
    n_val: int = 300
    n_test: int = 300
    captions_per_video: int = 4  # whole-video descriptions, four phrasings
    queries_per_video: int = 2  # moment queries, each one event, state or motion with its span
    max_objects: int = 3  # 1..3; captions stay under ~30 words
    seed: int = 0  # the split index is mixed in, so splits differ for the same seed


MOTIONS = ("still", "left", "right", "up", "down")
EVENTS = ("none", "appear", "disappear", "recolour")
N_OBJECTS_P = (0.30, 0.45, 0.25)  # P(1 object), P(2), P(3)
MOTION_P = (0.2, 0.2, 0.2, 0.2, 0.2)
EVENT_P = (0.3, 0.2, 0.2, 0.3)
_DIRECTION = {"still": (0, 0), "left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # y down
_EXTENT = 1.3  # a shape of radius r fits in a disc of 1.3 r (triangle corners are at 1.28 r)
_MOMENT_HALF_WIDTH = 0.5  # seconds either side of an instantaneous event


@dataclass(frozen=True)
class MomentQuery:
    """A sentence and the span ``[start, end]`` of the video (seconds) it describes."""

    text: str
    start: float
    end: float


@dataclass(frozen=True)
class MovingObject:
    """One object of a video: what it is, where it goes and its one event. Frames are indices.

    Visible on frames ``[start_frame, end_frame)``; moves by ``(vx, vy)`` px per frame between frames
    ``move_start`` and ``move_end`` and stands still otherwise; ``event_frame`` is the first frame
    of the new state (appear: first visible frame; disappear: first invisible; recolour: first in
    ``new_colour``), -1 for ``event == "none"``.
    """

    shape: str
    colour: str
    size: str
    r: float
    x0: float  # centre at frame 0 (and until move_start)
    y0: float
    motion: str  # "still" | "left" | "right" | "up" | "down"
    vx: float
    vy: float
    move_start: int
    move_end: int
    event: str  # "none" | "appear" | "disappear" | "recolour"
    event_frame: int
    new_colour: str | None
    start_frame: int
    end_frame: int

    def centre(self, f: np.ndarray | int) -> tuple[np.ndarray, np.ndarray]:
        """Centre (x, y) in pixels on frame(s) ``f``."""
        t = np.clip(np.asarray(f) - self.move_start, 0, self.move_end - self.move_start)
        return self.x0 + self.vx * t, self.y0 + self.vy * t

    def colour_at(self, f: int) -> str:
        return self.new_colour if self.event == "recolour" and f >= self.event_frame else self.colour


@dataclass
class VideoSplit:
    """One split of a video-caption dataset; video ``i`` is described by ``captions[i]``."""

    name: str  # "moving_shapes"
    split: str  # "train" | "val" | "test"
    videos: np.ndarray  # (N, F, H, W, 3) uint8
    captions: list[list[str]]  # N lists of captions_per_video whole-video descriptions
    queries: list[list[MomentQuery]]  # N lists of queries_per_video moment queries
    objects: list[list[MovingObject]]  # N lists of 1-3 objects: the ground truth behind the pixels
    fps: float

    @property
    def duration(self) -> float:
        """Seconds per video: every span lies in ``[0, duration]``."""
        return self.videos.shape[1] / self.fps

    @property
    def captions_per_video(self) -> int:
        return len(self.captions[0]) if self.captions else 0

    def __len__(self) -> int:
        return len(self.captions)

    def flat_captions(self) -> list[str]:
        """All captions, caption ``j`` of video ``i`` at index ``i * captions_per_video + j``."""
        return [c for caps in self.captions for c in caps]

    def caption_video_index(self) -> np.ndarray:
        """(N * captions_per_video,) int64: the video index each flat caption describes."""
        return np.repeat(np.arange(len(self.captions), dtype=np.int64), self.captions_per_video)


# ----------------------------------------------------------------------------- videos


def _split_size(split: str, cfg: MovingShapesConfig) -> int:
    if split not in SPLIT_INDEX:
        raise InputError(f"unknown split {split!r}; expected one of {sorted(SPLIT_INDEX)}")
    if not 1 <= cfg.max_objects <= 3:
        raise InputError(f"max_objects is {cfg.max_objects}; expected 1, 2 or 3")
    if cfg.image_size < 16:
        raise InputError(f"image_size is {cfg.image_size}; expected at least 16 pixels")
    if cfg.n_frames < 8:
        raise InputError(f"n_frames is {cfg.n_frames}; expected at least 8 frames")
    if cfg.fps <= 0:
        raise InputError(f"fps is {cfg.fps}; expected a positive frame rate")
    return {"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test}[split]


def _frac(rng: np.random.Generator, n: int, lo: float, hi: float) -> int:
    """A frame index uniform in ``[round(lo n), round(hi n)]``."""
    return int(rng.integers(round(lo * n), round(hi * n) + 1))


def _sample_object(
    rng: np.random.Generator, cfg: MovingShapesConfig, free: list[str], event: str
) -> MovingObject:
    s, n = cfg.image_size, cfg.n_frames
    size = SIZES[rng.integers(2)]
    r = _RADIUS[size] * s * rng.uniform(0.9, 1.1)
    colour = free.pop(int(rng.integers(len(free))))
    new_colour = free.pop(int(rng.integers(len(free)))) if event == "recolour" else None
    start, end, event_frame = 0, n, -1
    if event == "appear":
        start = event_frame = _frac(rng, n, 0.1, 0.6)
    elif event == "disappear":
        end = event_frame = _frac(rng, n, 0.4, 0.9)
    elif event == "recolour":
        event_frame = _frac(rng, n, 0.15, 0.85)
    motion = MOTIONS[rng.choice(len(MOTIONS), p=MOTION_P)]
    visible = end - start
    length = int(rng.integers(max(2, visible // 4), visible + 1))  # frames the motion lasts
    move_start = start + int(rng.integers(visible - length + 1))
    lo, hi = r * _EXTENT + 1, s - 1 - r * _EXTENT  # centre range that keeps the shape inside
    travel = rng.uniform(0.45, 0.9) * (hi - lo) if motion != "still" else 0.0
    ux, uy = _DIRECTION[motion]
    x0, y0 = rng.uniform(lo, hi, size=2)
    if ux:
        x0 = rng.uniform(lo, hi - travel) if ux > 0 else rng.uniform(lo + travel, hi)
    if uy:
        y0 = rng.uniform(lo, hi - travel) if uy > 0 else rng.uniform(lo + travel, hi)
    shape = SHAPES[rng.integers(len(SHAPES))]
    return MovingObject(
        shape,
        colour,
        size,
        float(r),
        float(x0),
        float(y0),
        motion,
        float(ux * travel / length),
        float(uy * travel / length),
        move_start,
        move_start + length,
        event,
        event_frame,
        new_colour,
        start,
        end,
    )


def _apart(a: MovingObject, b: MovingObject) -> bool:
    """True when ``a`` and ``b`` never touch on a frame where both are visible."""
    f = np.arange(max(a.start_frame, b.start_frame), min(a.end_frame, b.end_frame))
    if len(f) == 0:
        return True
    (ax, ay), (bx, by) = a.centre(f), b.centre(f)
    return bool(np.hypot(ax - bx, ay - by).min() >= _EXTENT * (a.r + b.r) + 1)


def _sample_video(rng: np.random.Generator, cfg: MovingShapesConfig) -> list[MovingObject]:
    n = min(1 + int(rng.choice(len(N_OBJECTS_P), p=N_OBJECTS_P)), cfg.max_objects)
    while True:  # rejection sampling: restart the video if an object finds no free trajectory
        events = [EVENTS[rng.choice(len(EVENTS), p=EVENT_P)] for _ in range(n)]
        if all(e == "none" for e in events):  # every video has something to query
            events[int(rng.integers(n))] = EVENTS[1 + int(rng.integers(3))]
        free, objs = list(COLOUR_NAMES), []
        for event in events:
            for _ in range(50):
                o = _sample_object(rng, cfg, list(free), event)
                if all(_apart(o, p) for p in objs):
                    objs.append(o)
                    free = [c for c in free if c not in (o.colour, o.new_colour)]
                    break
            else:
                break
        if len(objs) == n:
            return objs


def sample_videos(split: str, cfg: MovingShapesConfig = MovingShapesConfig()) -> list[list[MovingObject]]:
    """The object metadata of every video of ``split`` (what ``make_moving_shapes`` draws and describes)."""
    n = _split_size(split, cfg)
    rng = np.random.default_rng([cfg.seed, SPLIT_INDEX[split], 10])
    return [_sample_video(rng, cfg) for _ in tqdm(range(n), desc=f"moving_shapes {split}", disable=None)]


# ----------------------------------------------------------------------------- pixels


def draw_videos(
    videos: list[list[MovingObject]], n_frames: int, image_size: int, seed: int | list[int] = 0
) -> np.ndarray:
    """(N, F, S, S, 3) uint8: every object on every frame it is visible, vectorised like ``draw_scenes``.

    One numpy pass per (object slot, shape kind) over all (video, frame) instances; the background
    grey and each object's colour jitter are fixed per video, so nothing flickers.
    """
    n, s = len(videos), image_size
    rng = np.random.default_rng(seed)
    background = rng.integers(0, 30, size=(n, 1, 1, 1, 1))  # dark grey level per video
    frames = np.broadcast_to(background, (n, n_frames, s, s, 3)).astype(np.uint8)
    slots = [(i, k, o) for i, objs in enumerate(videos) for k, o in enumerate(objs)]
    jitter = rng.integers(-15, 16, size=(len(slots), 3))  # a little colour noise per object
    w = 2 * int(np.ceil(max(_RADIUS.values()) * 1.1 * s)) + 4  # window side, covers the largest object
    v, u = np.mgrid[0:w, 0:w]  # (W, W) window rows, cols
    f = np.arange(n_frames)  # (F,)
    for k in range(max((len(objs) for objs in videos), default=0)):
        for shape in SHAPES:
            sel = [j for j, (_, kk, o) in enumerate(slots) if kk == k and o.shape == shape]
            if not sel:
                continue
            objs = [slots[j][2] for j in sel]
            cx, cy = (np.stack(c) for c in zip(*(o.centre(f) for o in objs), strict=True))  # (B, F)
            start, end = (np.array([[o.start_frame, o.end_frame] for o in objs]).T)[:, :, None]
            change = np.array([o.event_frame if o.event == "recolour" else n_frames for o in objs])[:, None]
            b, t = np.nonzero((f >= start) & (f < end))  # visible (object, frame) instances
            rgb = (
                np.stack(
                    [[COLOURS[o.colour] for o in objs], [COLOURS[o.new_colour or o.colour] for o in objs]]
                )
                + jitter[sel]
            )  # (2, B, 3): colour before / after a change
            rgb = np.clip(rgb, 0, 255).astype(np.uint8)[(t >= change[b, 0]).astype(np.int64), b]  # (I, 3)
            x, y = cx[b, t].astype(np.float32), cy[b, t].astype(np.float32)
            r = np.array([o.r for o in objs], dtype=np.float32)[b]
            x0 = np.floor(x).astype(np.int64)[:, None, None] - w // 2  # (I, 1, 1) window origin
            y0 = np.floor(y).astype(np.int64)[:, None, None] - w // 2
            px, py = x0 + u, y0 + v  # (I, W, W) pixel coordinates
            dx, dy = px + 0.5 - x[:, None, None], py + 0.5 - y[:, None, None]
            mask = _shape_mask(shape, dx, dy, r[:, None, None]) & (px >= 0) & (px < s) & (py >= 0) & (py < s)
            ii, yy, xx = np.nonzero(mask)
            vid = np.array([slots[j][0] for j in sel], dtype=np.int64)[b]
            frames[vid[ii], t[ii], py[ii, yy, xx], px[ii, yy, xx]] = rgb[ii]
    return frames


# ----------------------------------------------------------------------------- text

_MOVE = {  # (finite, participle)
    "left": (
        ("moves left", "moving left"),
        ("moves to the left", "moving to the left"),
        ("slides left", "sliding left"),
    ),
    "right": (
        ("moves right", "moving right"),
        ("moves to the right", "moving to the right"),
        ("slides right", "sliding right"),
    ),
    "up": (("moves up", "moving up"), ("goes up", "going up"), ("rises", "rising")),
    "down": (("moves down", "moving down"), ("goes down", "going down"), ("falls", "falling")),
    "still": (
        ("stays still", "staying still"),
        ("does not move", "not moving"),
        ("stays in place", "staying in place"),
    ),
}
_APPEAR = ("appears", "shows up", "comes into view")
_DISAPPEAR = ("disappears", "vanishes", "goes away")
_RECOLOUR = ("turns {}", "becomes {}", "changes colour to {}")
_THEN = ("and then", "then", "and later")
_INTRO = ("", "in this video ", "a video where ", "we see that ")


MAX_WORDS = 30  # the tokenizer keeps 32 tokens; longer captions are rebuilt in the short form


def _noun(rng: np.random.Generator, o: MovingObject, with_size: bool) -> str:
    """'small red circle' or 'red circle' (the initial colour)."""
    size = f"{_pick(rng, _SIZE_WORDS[o.size])} " if with_size else ""
    return f"{size}{o.colour} {o.shape}"


def _clause(rng: np.random.Generator, o: MovingObject, short: bool) -> str:
    """What ``o`` does over the whole video, in time order: 'appears and then moves up'.

    ``short`` takes the first (shortest) phrasing of everything."""
    move, moving = _MOVE[o.motion][0 if short else rng.integers(3)]
    if o.event == "none":
        return move
    if o.event == "recolour":
        event = (_RECOLOUR[0] if short else _pick(rng, _RECOLOUR)).format(o.new_colour)
    else:
        words = _APPEAR if o.event == "appear" else _DISAPPEAR
        event = words[0] if short else _pick(rng, words)
    then = "then" if short else _pick(rng, _THEN)
    if o.motion == "still":
        return event if short or rng.random() < 0.7 else f"{move} and {event}"
    if o.event_frame <= o.move_start:  # appearing always comes first
        return f"{event} {then} {move}"
    if o.event_frame >= o.move_end:  # disappearing always comes last
        return f"{move} {then} {event}"
    return f"{event} while {moving}"


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else " ".join(items[:-1]) + " and " + items[-1]


def _caption(rng: np.random.Generator, objs: list[MovingObject], t: int, short: bool) -> str:
    """Template ``t`` (0..3) over the objects in the given order."""
    parts = [(_noun(rng, o, not short), _clause(rng, o, short)) for o in objs]
    if t == 0 and len(parts) == 2:  # "a red circle moves left while a blue square stays still"
        joint = " and " if any(" while " in c for _, c in parts) else " while "  # never two whiles
        return joint.join(f"a {n} {c}" for n, c in parts)
    if t == 1:  # "there is a red circle that moves left and a blue square that ..."
        return "there is " + _and([f"a {n} that {c}" for n, c in parts])
    if t == 2 and len(parts) == 1:
        return f"a single {parts[0][0]} {parts[0][1]}"
    if t == 2:  # "a red circle and a blue square the red circle moves left and the blue square ..."
        return _and([f"a {n}" for n, _ in parts]) + " " + _and([f"the {n} {c}" for n, c in parts])
    intro = "" if t == 0 or short else _pick(rng, _INTRO)  # "in this video a red circle moves left ..."
    return intro + _and([f"a {n} {c}" for n, c in parts])


def describe_video(rng: np.random.Generator, objs: list[MovingObject], n_captions: int) -> list[str]:
    """``n_captions`` phrasings of one video; each names the colour, shape and behaviour of every object.

    Four templates; a caption over ``MAX_WORDS`` is rebuilt without sizes and synonyms, and if still
    too long (three busy objects) with the plainest template."""
    templates = rng.permutation(4)
    captions = []
    for j in range(n_captions):
        t = int(templates[j % 4])
        order = [objs[i] for i in rng.permutation(len(objs))]  # who comes first varies per caption
        text = _caption(rng, order, t, short=False)
        if len(text.split()) > MAX_WORDS:
            text = _caption(rng, order, t, short=True)
        if len(text.split()) > MAX_WORDS:
            text = _caption(rng, order, 0, short=True)
        captions.append(text)
    return captions


def _moments(o: MovingObject, fps: float, n_frames: int) -> list[tuple[str, float, float]]:
    """Every (kind, start, end) moment of ``o``, in seconds: its event, its states, its motion."""
    duration, t = n_frames / fps, o.event_frame / fps
    out = []
    if o.event != "none":  # a 1 s window around the instant, clipped to the video
        out.append((o.event, max(0.0, t - _MOMENT_HALF_WIDTH), min(duration, t + _MOMENT_HALF_WIDTH)))
    if o.event in ("appear", "disappear"):
        out.append(("visible", o.start_frame / fps, o.end_frame / fps))
    if o.event == "recolour":
        out += [("before", 0.0, t), ("after", t, duration)]
    if o.motion != "still":
        out.append(("motion", o.move_start / fps, o.move_end / fps))
    return out


def _query_text(rng: np.random.Generator, o: MovingObject, kind: str) -> str:
    the = f"the {o.colour} {o.shape}"
    if kind == "appear":
        return _pick(rng, (f"{the} appears", f"when does {the} appear", f"{the} comes into view"))
    if kind == "disappear":
        return _pick(rng, (f"{the} disappears", f"when does {the} disappear", f"{the} vanishes"))
    if kind == "recolour":
        c = o.new_colour
        return _pick(rng, (f"{the} turns {c}", f"when does {the} become {c}", f"{the} changes colour"))
    if kind in ("visible", "before"):
        return _pick(rng, (f"{the} is visible", f"{the} is on screen", f"when can we see {the}"))
    if kind == "after":
        return _pick(rng, (f"the {o.shape} is {o.new_colour}", f"the {o.new_colour} {o.shape} is visible"))
    move, moving = _MOVE[o.motion][rng.integers(3)]
    return _pick(rng, (f"{the} {move}", f"{the} is {moving}", f"when is {the} {moving}"))


def query_video(
    rng: np.random.Generator, objs: list[MovingObject], n_queries: int, fps: float, n_frames: int
) -> list[MomentQuery]:
    """``n_queries`` distinct moments of one video (repeated, rephrased, if it has fewer)."""
    moments = [(o, kind, a, b) for o in objs for kind, a, b in _moments(o, fps, n_frames)]
    order = rng.permutation(len(moments))
    picks = [moments[order[j % len(moments)]] for j in range(n_queries)]
    return [MomentQuery(_query_text(rng, o, kind), a, b) for o, kind, a, b in picks]


# ----------------------------------------------------------------------------- the split


def make_moving_shapes(split: str, cfg: MovingShapesConfig = MovingShapesConfig()) -> VideoSplit:
    """Generate one MovingShapes split: ``(N, F, S, S, 3)`` uint8 videos, captions and moment queries."""
    objects = sample_videos(split, cfg)
    videos = draw_videos(objects, cfg.n_frames, cfg.image_size, seed=[cfg.seed, SPLIT_INDEX[split], 12])
    rng = np.random.default_rng([cfg.seed, SPLIT_INDEX[split], 11])
    captions = [describe_video(rng, objs, cfg.captions_per_video) for objs in objects]
    queries = [query_video(rng, objs, cfg.queries_per_video, cfg.fps, cfg.n_frames) for objs in objects]
    return VideoSplit(
        name="moving_shapes",
        split=split,
        videos=videos,
        captions=captions,
        queries=queries,
        objects=objects,
        fps=cfg.fps,
    )
