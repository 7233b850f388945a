"""A small frame CNN pre-trained on MovingShapes frames, the region feature extractor of the video models.

ViSERN wants K region features per frame ``(B, F, K, D)`` and ProTA frame tokens ``(B, F, D)``; the
papers take them from detectors / CLIP pre-trained on large image sets. Nothing is downloaded here, so
the stand-in is reconstructed: ``rvse.Backbone`` (CoordConv CNN, a 4 x 4 grid of 96-d regions on a
32 px frame) trained with supervision read from the generator's metadata, one frame at a time:

- per frame (head on the mean-pooled regions, i.e. on the frame token): multi-hot over the colours,
  the shapes, the (colour, shape) pairs and the (colour, size) pairs visible on it, so the pooled
  token has to bind attributes to objects;
- per region (one linear head shared by the K regions): multi-hot over the colours and shapes of the
  objects covering at least ``min_region_pixels`` of that grid cell, so region features keep where
  things are (the "coarse position bins per colour" at the resolution of the grid itself).

Loss: BCE on both heads (summed). Motion and events are not single-frame facts; the video models learn
them from the frame sequence. The heads are dropped after pre-training: only the CNN is kept.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from xmr.models.data.moving_shapes import MovingObject, VideoSplit
from xmr.models.data.shapes import COLOUR_NAMES, SHAPES, SIZES, _shape_mask
from xmr.models.errors import InputError
from xmr.models.image_text.preprocess import preprocess_images
from xmr.models.image_text.rvse import Backbone
from xmr.models.train.loop import FitConfig, Task, fit


@dataclass
class BackboneConfig:
    channels: tuple[int, ...] = (32, 64, 96)  # 3 stride-2 stages: 32 px -> 4 x 4 grid, K = 16, D = 96
    image_size: int = 32  # must equal MovingShapesConfig.image_size
    # Fixed pixel normalisation, (x / 255 - mean) / std: the backgrounds are dark grey (<= 30/255, i.e.
    # about -0.3..-0.2 after it) and the palette colours are bright (up to +3.4); the same values as RVSE.
    pixel_mean: tuple[float, float, float] = field(default=(0.1, 0.1, 0.1))
    pixel_std: tuple[float, float, float] = field(default=(0.25, 0.25, 0.25))
    steps: int = 1200  # pre-training budget: 1200 x 64 frames is ~40 s on one CPU core
    batch_size: int = 64  # more small steps beat fewer large ones at a fixed budget (held-out F1 .96 vs .92)
    lr: float = 1e-2  # AdamW, cosine decay to 0 after a 5% warm-up; 3e-3 under-trains in this budget
    weight_decay: float = 1e-4
    holdout: float = 0.1  # the last 10% of the train videos only score the pre-training
    min_region_pixels: int = 2  # an object "covers" a grid cell with at least this many of its pixels
    seed: int = 0

    @property
    def grid(self) -> tuple[int, int]:
        """(h, w) of the region grid: the frame side over the CNN stride 2 ** len(channels)."""
        g = self.image_size // 2 ** len(self.channels)
        return g, g

    @classmethod
    def from_dict(cls, d: dict) -> BackboneConfig:
        d = dict(d)
        for k in ("channels", "pixel_mean", "pixel_std"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


def _check_config(cfg: BackboneConfig) -> None:
    stride = 2 ** len(cfg.channels)
    if not cfg.channels or cfg.image_size % stride:
        raise InputError(
            f"image_size {cfg.image_size} is not a multiple of the CNN stride {stride} "
            f"(2 ** len(channels={cfg.channels})); expected e.g. 32 with three stages"
        )


class FrameBackbone(nn.Module):
    """Normalised pixels (N, 3, S, S) -> region features (N, K, D), K = h * w regions in row-major order."""

    def __init__(self, cfg: BackboneConfig = BackboneConfig()):
        super().__init__()
        _check_config(cfg)
        self.cfg = cfg
        self.cnn = Backbone(cfg.channels)

    @property
    def dim(self) -> int:
        return self.cfg.channels[-1]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.cnn(pixels)  # (N, K, D)


# ----------------------------------------------------------------------------- labels

N_GLOBAL = len(COLOUR_NAMES) + len(SHAPES) + len(COLOUR_NAMES) * (len(SHAPES) + len(SIZES))  # 6+5+30+12
N_REGION = len(COLOUR_NAMES) + len(SHAPES)


def frame_labels(
    objects: list[list[MovingObject]], n_frames: int, image_size: int, grid: tuple[int, int], min_pixels: int
) -> tuple[np.ndarray, np.ndarray]:
    """Multi-hot targets of every frame: global ``(N, F, N_GLOBAL)`` and per region ``(N, F, K, N_REGION)``
    uint8. Global columns: colour, shape, (colour, shape), (colour, size); region columns: colour, shape."""
    n, s, (gh, gw) = len(objects), image_size, grid
    nc, ns = len(COLOUR_NAMES), len(SHAPES)
    glob = np.zeros((n, n_frames, N_GLOBAL), dtype=np.uint8)
    region = np.zeros((n, n_frames, gh * gw, N_REGION), dtype=np.uint8)
    f = np.arange(n_frames)
    py, px = np.mgrid[0:s, 0:s] + 0.5  # (S, S) pixel centres
    for i, objs in enumerate(objects):
        for o in objs:
            visible = (f >= o.start_frame) & (f < o.end_frame)
            colour = np.array([COLOUR_NAMES.index(o.colour_at(t)) for t in f])  # (F,)
            c, sh, sz = colour[visible], SHAPES.index(o.shape), SIZES.index(o.size)
            t = f[visible]
            glob[i, t, c] = 1
            glob[i, t, nc + sh] = 1
            glob[i, t, nc + ns + c * ns + sh] = 1
            glob[i, t, nc + ns + nc * ns + c * len(SIZES) + sz] = 1
            x, y = (a[visible].astype(np.float32)[:, None, None] for a in o.centre(f))
            mask = _shape_mask(o.shape, px - x, py - y, np.float32(o.r))  # (T, S, S)
            cells = mask.reshape(len(t), gh, s // gh, gw, s // gw).sum(axis=(2, 4)).reshape(len(t), -1)
            tt, kk = np.nonzero(cells >= min_pixels)
            region[i, t[tt], kk, c[tt]] = 1
            region[i, t[tt], kk, nc + sh] = 1
    return glob, region


# ----------------------------------------------------------------------------- pre-training


def _micro_f1(logits: torch.Tensor, target: torch.Tensor) -> float:
    pred, target = logits > 0, target > 0.5
    tp = (pred & target).sum().item()
    return 2 * tp / max(pred.sum().item() + target.sum().item(), 1)


class _Heads(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.frame = nn.Linear(dim, N_GLOBAL)  # on the mean-pooled regions (the frame token)
        self.region = nn.Linear(dim, N_REGION)  # shared by every region

    def forward(self, regions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.frame(regions.mean(dim=1)), self.region(regions)  # (B, G), (B, K, L)


def _pixels(videos: np.ndarray, vid: np.ndarray, frame: np.ndarray, cfg: BackboneConfig) -> torch.Tensor:
    return torch.from_numpy(preprocess_images(videos[vid, frame], cfg.pixel_mean, cfg.pixel_std))


@torch.no_grad()
def _score(backbone, heads, videos, glob, region, vid, frame, cfg) -> dict[str, float]:
    backbone.eval()
    g_logits, r_logits, g_true, r_true = [], [], [], []
    for a in range(0, len(vid), 512):
        v, t = vid[a : a + 512], frame[a : a + 512]
        g, r = heads(backbone(_pixels(videos, v, t, cfg)))
        g_logits.append(g)
        r_logits.append(r)
        g_true.append(torch.from_numpy(glob[v, t]))
        r_true.append(torch.from_numpy(region[v, t]))
    g, r, gt, rt = (torch.cat(x) for x in (g_logits, r_logits, g_true, r_true))
    backbone.train()
    return {
        "frame_f1": round(_micro_f1(g, gt), 4),  # micro-F1 of the per-frame multi-hot
        "frame_exact": round(((g > 0) == (gt > 0)).all(dim=1).float().mean().item(), 4),  # all 53 right
        "region_f1": round(_micro_f1(r, rt), 4),
    }


class PretrainTask(Task):
    """Frame-level multi-label training of a `FrameBackbone` with its two heads (see the module docstring).

    Step-based rather than epoch-based: `fit` runs one "epoch" of `steps` batches, each `batch_size`
    random (video, frame) pairs drawn with replacement from the first `n_train` videos."""

    name = "pretrain frame backbone"

    def __init__(self, split: VideoSplit, cfg: BackboneConfig, steps: int, n_train: int):
        self.split, self.cfg, self.steps, self.n_train = split, cfg, steps, n_train
        n_frames, s = split.videos.shape[1:3]
        self.glob, self.region = frame_labels(split.objects, n_frames, s, cfg.grid, cfg.min_region_pixels)
        self.backbone, self.heads = FrameBackbone(cfg), _Heads(cfg.channels[-1])
        self.model = nn.Sequential(self.backbone, self.heads)  # pixels -> (frame logits, region logits)

    def steps_per_epoch(self, batch_size: int) -> int:
        return self.steps

    def batches(self, rng: np.random.Generator, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        n_frames = self.split.videos.shape[1]
        for _ in range(self.steps):
            yield rng.integers(self.n_train, size=batch_size), rng.integers(n_frames, size=batch_size)

    def loss(
        self, batch: tuple[np.ndarray, np.ndarray], rng: np.random.Generator, epoch: int
    ) -> torch.Tensor:
        vid, frame = batch
        g, r = self.model(_pixels(self.split.videos, vid, frame, self.cfg))
        return F.binary_cross_entropy_with_logits(
            g, torch.from_numpy(self.glob[vid, frame]).float()
        ) + F.binary_cross_entropy_with_logits(r, torch.from_numpy(self.region[vid, frame]).float())

    def score(self, vid: np.ndarray, frame: np.ndarray) -> dict[str, float]:
        return _score(
            self.backbone, self.heads, self.split.videos, self.glob, self.region, vid, frame, self.cfg
        )


def pretrain_backbone(
    split: VideoSplit,
    cfg: BackboneConfig = BackboneConfig(),
    steps: int | None = None,
    seed: int | None = None,
) -> FrameBackbone:
    """Pre-train a ``FrameBackbone`` on frames drawn uniformly from ``split`` (the train split).

    ``steps`` and ``seed`` override ``cfg.steps`` / ``cfg.seed``. The returned backbone is in eval mode
    and carries ``backbone.report``: the first / last training loss (mean of 10 steps), the seconds it
    took, and frame / region micro-F1 on train frames and on the held-out videos (``cfg.holdout``).
    """
    _check_config(cfg)
    steps = cfg.steps if steps is None else steps
    seed = cfg.seed if seed is None else seed
    n, n_frames, s = split.videos.shape[:3]
    if s != cfg.image_size:
        raise InputError(f"videos are {s} px; BackboneConfig.image_size is {cfg.image_size}")
    if steps < 1:
        raise InputError(f"steps is {steps}; expected at least 1 pre-training step")
    n_train = n - max(1, round(cfg.holdout * n)) if n > 1 else n
    rng = np.random.default_rng([seed, 20])  # batches, then the train frames scored after
    with torch.random.fork_rng(devices=[]):  # the caller's torch RNG stream is left as it was
        torch.manual_seed(seed)
        task = PretrainTask(split, cfg, steps, n_train)
        config = FitConfig(
            epochs=1,
            batch_size=cfg.batch_size,
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            warmup_steps=max(1, steps // 20),  # 5%
            schedule="warmup_times_cosine",
        )
        result = fit(task, config, rng=rng)
        k = min(10, len(result.losses))
        report = {"steps": steps, "seconds": round(result.seconds, 1)}
        report |= {
            "loss_first": round(float(np.mean(result.losses[:k])), 4),
            "loss_last": round(float(np.mean(result.losses[-k:])), 4),
        }
        m = min(2048, n_train * n_frames)
        idx = rng.choice(n_train * n_frames, size=m, replace=False)
        report["train"] = task.score(idx // n_frames, idx % n_frames)
        if n_train < n:
            idx = np.arange(n_train * n_frames, n * n_frames)[: 2048 * 4 : 4]  # every 4th held-out frame
            report["heldout"] = task.score(idx // n_frames, idx % n_frames)
    backbone = task.backbone.eval()
    backbone.report = report
    return backbone


# ----------------------------------------------------------------------------- extraction


@torch.no_grad()
def extract_regions(backbone: FrameBackbone, videos: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """uint8 videos (N, F, S, S, 3) -> float32 region features (N, F, K, D), frame by frame, normalised
    with the backbone's ``pixel_mean`` / ``pixel_std``; regions are the grid cells in row-major order."""
    cfg = backbone.cfg
    if (
        videos.dtype != np.uint8
        or videos.ndim != 5
        or videos.shape[2:] != (cfg.image_size, cfg.image_size, 3)
    ):
        raise InputError(
            f"videos are {videos.dtype} {videos.shape}; expected uint8 (N, F, {cfg.image_size}, "
            f"{cfg.image_size}, 3)"
        )
    n, n_frames = videos.shape[:2]
    frames = videos.reshape(n * n_frames, *videos.shape[2:])
    k = cfg.grid[0] * cfg.grid[1]
    out = np.empty((n * n_frames, k, backbone.dim), dtype=np.float32)
    backbone.eval()
    for a in tqdm(range(0, len(frames), batch_size), desc="extract regions", disable=None):
        x = torch.from_numpy(preprocess_images(frames[a : a + batch_size], cfg.pixel_mean, cfg.pixel_std))
        out[a : a + batch_size] = backbone(x).numpy()
    return out.reshape(n, n_frames, k, backbone.dim)


# ----------------------------------------------------------------------------- files

WEIGHTS, CONFIG = "backbone.safetensors", "backbone.json"


def save_backbone(backbone: FrameBackbone, folder: str | Path) -> None:
    """``folder/backbone.safetensors`` (CNN weights) + ``folder/backbone.json`` (config and the
    pre-training report), each written to a temporary file first and moved into place."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{WEIGHTS}.{os.getpid()}.tmp"
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, str(tmp))
    os.replace(tmp, folder / WEIGHTS)
    meta = {"config": asdict(backbone.cfg), "report": getattr(backbone, "report", {})}
    tmp = folder / f".{CONFIG}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, folder / CONFIG)


def load_backbone(folder: str | Path) -> FrameBackbone:
    """The backbone ``save_backbone`` wrote to ``folder``, in eval mode, with its ``report``."""
    folder = Path(folder)
    if not (folder / WEIGHTS).is_file() or not (folder / CONFIG).is_file():
        raise InputError(f"{folder} has no frame backbone; expected {WEIGHTS} and {CONFIG} in it")
    meta = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    backbone = FrameBackbone(BackboneConfig.from_dict(meta["config"]))
    try:
        backbone.load_state_dict(load_file(str(folder / WEIGHTS)))
    except Exception as e:  # safetensors raises its own error types on truncated/corrupt files
        raise InputError(f"{folder / WEIGHTS} is not a readable backbone checkpoint: {e}") from e
    backbone.report = meta.get("report", {})
    return backbone.eval()
