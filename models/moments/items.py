"""The (video, moment query) pairs of a split and the batches CDNet trains and is scored on.

Clip t covers [t / fps, (t + 1) / fps); it is "inside" a window when its centre is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from xmr.models.data.video import VideoFeatures
from xmr.models.moments.cdnet import CDNet
from xmr.models.tokenizer import encode_batch


@dataclass
class MomentItems:
    """The (video, query) pairs of a split, flattened."""

    video: np.ndarray  # (N,) video index of each query
    texts: list[str]
    windows: np.ndarray  # (N, 2) seconds
    duration: float


def moment_items(data: VideoFeatures) -> MomentItems:
    video, texts, windows = [], [], []
    for v, queries in enumerate(data.queries):
        for q in queries:
            video.append(v)
            texts.append(q.text)
            windows.append((q.start, q.end))
    return MomentItems(
        np.array(video), texts, np.array(windows, dtype=np.float64), data.regions.shape[1] / data.fps
    )


def batch_inputs(model: CDNet, data: VideoFeatures, items: MomentItems, idx: np.ndarray, tokenizer, limits):
    v = items.video[idx]
    clips = torch.from_numpy(np.ascontiguousarray(data.frames[v]))
    mask = torch.from_numpy(np.ascontiguousarray(data.mask[v]))
    ids, lengths = map(torch.from_numpy, encode_batch(tokenizer, [items.texts[i] for i in idx], limits))
    grid = torch.from_numpy(np.ascontiguousarray(data.grid_features()[v])) if model.cfg.use_grid else None
    return clips, mask, ids, lengths, grid


def targets_of(items: MomentItems, idx: np.ndarray, n_clips: int, fps: float):
    """(list of (1, 2) normalised cxw targets, (B, T) bool clips inside the window)."""
    w = items.windows[idx] / items.duration  # (B, 2) normalised
    cxw = np.stack([(w[:, 0] + w[:, 1]) / 2, w[:, 1] - w[:, 0]], axis=1)
    targets = [torch.tensor(row[None], dtype=torch.float32) for row in cxw]
    centres = (np.arange(n_clips) + 0.5) / fps
    inside = (centres[None] >= items.windows[idx, :1]) & (centres[None] <= items.windows[idx, 1:])
    return targets, torch.from_numpy(inside)
