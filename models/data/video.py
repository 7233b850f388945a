"""Video datasets in the one form the video models (ViSERN, ProTA, CDNet) read: ``VideoFeatures``.

Per video, ``F`` frames of ``K`` region features ``(N, F, K, D)`` with a frame mask ``(N, F)``; frame
tokens ``(N, F, D)`` are the mean over the regions and, when the K regions are a spatial grid, the
``(N, F, h, w, D)`` grid is a reshape. Two sources, one registry (``VIDEO_DATASETS``):

- ``moving-shapes``: MovingShapes pixels through ``video.backbone.FrameBackbone``, pre-trained once on
  the train split. The backbone (safetensors + JSON) and each split's regions (.npy) and text (JSON)
  are cached under ``cache_dir/moving_shapes/``, keyed by short hashes of the configs, so a second
  load reads two files and generates nothing;
- ``video-features``: the public per-video feature folders (``video_features``), padded and masked.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from xmr.models.data.base import config_with
from xmr.models.data.moving_shapes import MomentQuery, MovingShapesConfig, VideoSplit, make_moving_shapes
from xmr.models.data.video_features import VideoFeatureSplit, load_video_features
from xmr.models.errors import InputError
from xmr.models.video.backbone import (
    BackboneConfig,
    extract_regions,
    load_backbone,
    pretrain_backbone,
    save_backbone,
)

CACHE_VERSION = 1  # bump when the labels, the extraction or the file layout change: old caches go stale


@dataclass
class VideoFeatures:
    """One split of a video-text dataset as region features; ``captions[i]`` describes video ``i``."""

    name: str
    split: str
    regions: np.ndarray  # (N, F, K, D) float32, zero on padded frames
    mask: np.ndarray  # (N, F) bool, True = a real frame (all True for MovingShapes)
    captions: list[list[str]]  # whole-video descriptions
    queries: list[list[MomentQuery]]  # moment queries (seconds); empty lists when the source has none
    fps: float  # frames per second of the feature sequence; NaN when the source does not say
    grid: tuple[int, int]  # (h, w), h * w == K; regions are row-major on it when they are a spatial grid

    @property
    def frames(self) -> np.ndarray:
        """(N, F, D) float32 frame tokens: the mean of the K regions, 0 on padded frames."""
        return self.regions.mean(axis=2) * self.mask[..., None]

    def grid_features(self) -> np.ndarray:
        """(N, F, h, w, D): the regions on their grid (a view, no copy)."""
        n, f, _, d = self.regions.shape
        return self.regions.reshape(n, f, *self.grid, d)

    @property
    def captions_per_video(self) -> int:
        """The number of captions of every video; an error when videos have different numbers."""
        counts = {len(c) for c in self.captions}
        if len(counts) > 1:
            raise InputError(
                f"{self.name} {self.split}: videos have {sorted(counts)} captions; use caption_video_index()"
            )
        return counts.pop() if counts else 0

    def __len__(self) -> int:
        return len(self.captions)

    def flat_captions(self) -> list[str]:
        """All captions, video by video (caption ``j`` of video ``i`` at ``i * cpv + j`` when every video
        has ``cpv`` captions)."""
        return [c for caps in self.captions for c in caps]

    def caption_video_index(self) -> np.ndarray:
        """(n_captions,) int64: the video index each flat caption describes."""
        counts = [len(caps) for caps in self.captions]
        return np.repeat(np.arange(len(self.captions), dtype=np.int64), counts)

    def subset(self, n: int) -> VideoFeatures:
        """The first ``n`` videos (views of the arrays)."""
        return dataclasses.replace(
            self,
            regions=self.regions[:n],
            mask=self.mask[:n],
            captions=self.captions[:n],
            queries=self.queries[:n],
        )


# ----------------------------------------------------------------------------- moving shapes

# MovingShapes fields the *train* pixels do not depend on: changing them keeps the cached backbone.
_NOT_TRAIN_PIXELS = ("n_val", "n_test", "captions_per_video", "queries_per_video", "fps")


def _key(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


def _atomic_save(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with path.open("wb") as f:  # a file object: np.save would append ".npy" to the temporary name
        np.save(f, array)


def _backbone_for(cfg: MovingShapesConfig, bcfg: BackboneConfig, folder: Path, train: VideoSplit | None):
    """The backbone cached in ``folder``, or one pre-trained on the train split (``train`` when it is
    already generated) and cached there."""
    try:
        return load_backbone(folder)
    except InputError:
        if (folder / "backbone.json").is_file():
            raise  # a corrupt cache is reported, not silently overwritten
    backbone = pretrain_backbone(train if train is not None else make_moving_shapes("train", cfg), bcfg)
    save_backbone(backbone, folder)
    return backbone


def load_moving_shapes_features(
    split: str,
    cfg: MovingShapesConfig = MovingShapesConfig(),
    cache_dir: str | Path = "runs/cache",
    backbone: BackboneConfig = BackboneConfig(),
) -> VideoFeatures:
    """MovingShapes ``split`` as ``(N, F, 16, 96)`` region features of the pre-trained frame backbone.

    Layout: ``cache_dir/moving_shapes/{backbone key}/backbone.{safetensors,json}`` and
    ``.../{split}-{split key}.{npy,json}`` (regions; captions, queries and fps). The backbone key
    hashes ``backbone`` and the MovingShapes fields the train pixels depend on; the split key hashes
    the whole ``cfg`` and the split. Files are written to a temporary name and moved into place.
    """
    if cfg.image_size != backbone.image_size:
        raise InputError(
            f"MovingShapesConfig.image_size is {cfg.image_size} but BackboneConfig.image_size is "
            f"{backbone.image_size}; expected them equal"
        )
    pixels = {k: v for k, v in asdict(cfg).items() if k not in _NOT_TRAIN_PIXELS}
    folder = Path(cache_dir) / "moving_shapes" / _key([CACHE_VERSION, pixels, asdict(backbone)])
    stem = folder / f"{split}-{_key([asdict(cfg), split])}"
    npy, meta = stem.with_suffix(".npy"), stem.with_suffix(".json")
    if not (npy.is_file() and meta.is_file()):
        data = make_moving_shapes(split, cfg)  # validates split and cfg
        net = _backbone_for(cfg, backbone, folder, data if split == "train" else None)
        regions = extract_regions(net, data.videos)
        _atomic_save(npy, lambda p: _save_npy(p, regions))
        text = {
            "captions": data.captions,
            "queries": [[[q.text, q.start, q.end] for q in qs] for qs in data.queries],
            "fps": data.fps,
        }
        _atomic_save(meta, lambda p: p.write_text(json.dumps(text) + "\n", encoding="utf-8"))
    regions = np.load(npy, allow_pickle=False)
    text = json.loads(meta.read_text(encoding="utf-8"))
    return VideoFeatures(
        name="moving_shapes",
        split=split,
        regions=regions,
        mask=np.ones(regions.shape[:2], dtype=bool),
        captions=text["captions"],
        queries=[[MomentQuery(t, a, b) for t, a, b in qs] for qs in text["queries"]],
        fps=float(text["fps"]),
        grid=backbone.grid,
    )


# ----------------------------------------------------------------------------- public feature folders


def squarest_grid(k: int) -> tuple[int, int]:
    """(h, w) with h * w == k, h <= w and h as large as possible: 16 -> (4, 4), 36 -> (6, 6),
    12 -> (3, 4), a prime 7 -> (1, 7)."""
    h = next(h for h in range(math.isqrt(k), 0, -1) if k % h == 0)
    return h, k // h


def from_feature_split(s: VideoFeatureSplit, max_frames: int | None = None) -> VideoFeatures:
    """A public feature split as ``VideoFeatures``: ``(F, D)`` frame features become K = 1 regions,
    ``(F, K, D)`` region features stay; videos are padded (and sampled down to ``max_frames``) with
    ``VideoFeatureSplit.padded``. The grid is ``squarest_grid(K)``: right for grid features (a CNN's
    7 x 7 map), a mere shape for detector regions (bottom-up boxes have no grid order). No moment
    queries; fps is NaN (the folders do not record it, and sampling frames changes it)."""
    if len(s) == 0:
        raise InputError(f"{s.name} {s.split} has no videos")
    feats, mask = s.padded(max_frames)
    regions = feats[:, :, None, :] if feats.ndim == 3 else feats  # (N, F, K, D)
    return VideoFeatures(
        name=s.name,
        split=s.split,
        regions=np.ascontiguousarray(regions, dtype=np.float32),
        mask=mask,
        captions=s.captions,
        queries=[[] for _ in s.captions],
        fps=float("nan"),
        grid=squarest_grid(regions.shape[2]),
    )


# ----------------------------------------------------------------------------- registry

VIDEO_DATASETS = {
    "moving-shapes": load_moving_shapes_features,  # (split, MovingShapesConfig, cache_dir) -> CNN regions
    "video-features": load_video_features,  # (root, split, max_frames) -> public per-video features
}


def load_video_split(
    name: str,
    split: str,
    root: str | None = None,
    cache_dir: str | Path = "runs/cache",
    backbone: BackboneConfig | None = None,
    **overrides,
) -> VideoFeatures:
    """Load ``split`` of video dataset ``name``. moving-shapes: ``overrides`` are MovingShapesConfig
    fields (``n_train=200``), ``backbone`` the frame backbone's config; video-features: ``root`` is
    the folder, ``max_frames`` the only override."""
    if name not in VIDEO_DATASETS:
        raise InputError(f"unknown video dataset {name!r}; expected one of {sorted(VIDEO_DATASETS)}")
    if name == "moving-shapes":
        cfg = config_with(MovingShapesConfig, overrides, "moving-shapes")
        return load_moving_shapes_features(split, cfg, cache_dir, backbone or BackboneConfig())
    if root is None:
        raise InputError("dataset 'video-features' needs root: the folder with features/ and captions.json")
    unknown = sorted(set(overrides) - {"max_frames"})
    if unknown:
        raise InputError(f"unknown video-features option(s) {unknown}; expected only ['max_frames']")
    max_frames = overrides.get("max_frames")
    return from_feature_split(load_video_features(root, split, max_frames), max_frames)


@dataclass
class VideoData:
    """Which video dataset a run trains and is scored on: the data fields of the video and moment training
    configs, so export and evaluation reload exactly the splits a run saw."""

    data: str = "moving-shapes"  # a key of VIDEO_DATASETS
    data_root: str | None = None  # folder of the public per-video feature format
    cache_dir: str = "runs/cache"  # backbone weights and extracted MovingShapes features
    n_train: int | None = None  # first n training videos (quick runs, tests)
    n_eval: int | None = None  # first n val/test videos
    data_overrides: dict | None = None  # MovingShapesConfig fields (tests use tiny splits)
    backbone_steps: int | None = None  # frame-backbone pre-training steps (None: BackboneConfig's default)

    @classmethod
    def of(cls, train_config: dict) -> VideoData:
        """The data fields of a run's `train_config` (config.json), ignoring the training fields."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in train_config.items() if k in names})

    def splits(self) -> dict[str, VideoFeatures]:
        """{"train", "val", "test"}, each cut to n_train / n_eval videos when those are set."""
        backbone = BackboneConfig(steps=self.backbone_steps) if self.backbone_steps else None
        out = {}
        for role, n in (("train", self.n_train), ("val", self.n_eval), ("test", self.n_eval)):
            split = load_video_split(
                self.data,
                role,
                root=self.data_root,
                cache_dir=self.cache_dir,
                backbone=backbone,
                **(self.data_overrides or {}),
            )
            out[role] = split.subset(n) if n else split
        return out
