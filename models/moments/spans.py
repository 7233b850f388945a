"""Span geometry of moment retrieval: (center, width) <-> (start, end), temporal IoU and generalised IoU.

Follows Moment-DETR (Lei et al., "QVHighlights: Detecting Moments and Highlights in Videos via Natural
Language Queries", NeurIPS 2021) and its public QVHighlights evaluation, which CDNet's head reuses.

Conventions (shared by the whole `xmr.models.moments` package)
Conventions
- A span is a pair of floats. ``xx`` = (start, end); ``cxw`` = (center, width). Spans are in seconds or
  normalised to [0, 1] by the video duration (normalised spans x duration = seconds).
- The network predicts ``cxw`` normalised spans (B, Q, 2) and one foreground logit per query (B, Q)
  (Moment-DETR's two-way softmax "foreground / no object" written as one sigmoid logit).
- Training targets are lists of (n_i, 2) ``cxw`` normalised tensors, one per video/query pair.
- Per-clip saliency scores (B, T) go with a clip mask (B, T), True = a real clip. Clip ``t`` of a video
  with ``T_v`` real clips covers the normalised interval [t / T_v, (t + 1) / T_v]: the clips are assumed to
  tile the whole video (QVHighlights: 2 s clips over 150 s videos).
- Predictions for evaluation are (K, 3) numpy arrays [start_s, end_s, score], highest score first; ground
  truth is a list of [start_s, end_s] windows per query.

Reconstructed: zero-length spans have their IoU denominators floored at 1e-9, so an empty span has IoU 0
with anything.
"""

from __future__ import annotations

import numpy as np
import torch

from xmr.models.errors import InputError

EPS = 1e-9
# ---------------------------------------------------------------------------------------------------------
# span algebra (torch)


def span_cxw_to_xx(spans: torch.Tensor) -> torch.Tensor:
    """(..., 2) (center, width) -> (..., 2) (start, end)."""
    c, w = spans[..., 0], spans[..., 1]
    return torch.stack([c - 0.5 * w, c + 0.5 * w], dim=-1)


def span_xx_to_cxw(spans: torch.Tensor) -> torch.Tensor:
    """(..., 2) (start, end) -> (..., 2) (center, width)."""
    s, e = spans[..., 0], spans[..., 1]
    return torch.stack([0.5 * (s + e), e - s], dim=-1)


def _check_pairs(name: str, spans) -> None:
    if spans.ndim != 2 or spans.shape[-1] != 2:
        raise InputError(f"{name} has shape {tuple(spans.shape)}; expected (N, 2) (start, end) spans")


def _iou_union(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    inter = (torch.min(a[:, None, 1], b[None, :, 1]) - torch.max(a[:, None, 0], b[None, :, 0])).clamp(min=0)
    union = (a[:, 1] - a[:, 0])[:, None] + (b[:, 1] - b[:, 0])[None, :] - inter
    return inter / union.clamp(min=EPS), union


def temporal_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, 2) x (M, 2) (start, end) spans -> (N, M) intersection over union."""
    _check_pairs("a", a)
    _check_pairs("b", b)
    return _iou_union(a, b)[0]


def generalized_temporal_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, 2) x (M, 2) (start, end) -> (N, M) gIoU = IoU - (|hull| - |union|) / |hull|, in [-1, 1].

    The hull is the smallest span covering both (Moment-DETR's 1-D version of Rezatofighi et al. 2019).
    """
    _check_pairs("a", a)
    _check_pairs("b", b)
    iou, union = _iou_union(a, b)
    hull = (torch.max(a[:, None, 1], b[None, :, 1]) - torch.min(a[:, None, 0], b[None, :, 0])).clamp(min=EPS)
    return iou - (hull - union) / hull


def temporal_iou_np(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, 2) x (M, 2) (start, end) -> (N, M) IoU, float64 numpy twin of `temporal_iou`."""
    inter = np.clip(
        np.minimum(a[:, None, 1], b[None, :, 1]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None
    )
    union = (a[:, 1] - a[:, 0])[:, None] + (b[:, 1] - b[:, 0])[None, :] - inter
    return inter / np.maximum(union, EPS)


def as_numpy(name: str, x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise InputError(f"{name} is not numeric ({e})") from e
