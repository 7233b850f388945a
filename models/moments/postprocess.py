"""Decoding the moment head's outputs into [start, end, score] windows in seconds (numpy).

One function, `postprocess`, shared by evaluation, the ONNX parity check and the Triton server.
"""

from __future__ import annotations

import numpy as np

from xmr.models.errors import InputError
from xmr.models.moments.spans import as_numpy, temporal_iou_np


def temporal_nms(windows: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy NMS on score-sorted (K, 3) windows: drop a window whose IoU with a kept one is > threshold."""
    keep: list[int] = []
    for i in range(len(windows)):
        if not keep or temporal_iou_np(windows[i : i + 1, :2], windows[keep, :2]).max() <= iou_threshold:
            keep.append(i)
    return windows[keep]


def postprocess(
    spans, logits, durations, top_k: int | None = None, nms_iou: float | None = None
) -> list[np.ndarray]:
    """Decode the head: (B, Q, 2) cxw normalised, (B, Q) logits, (B,) seconds -> B arrays (K, 3).

    Each row is [start_s, end_s, score], score = sigmoid(logit), highest first (stable for ties). Widths
    are floored at 0, spans scaled by the duration and clipped to [0, duration] (a span wholly outside
    becomes zero-length and is kept). Then optional greedy NMS (``nms_iou``: drop IoU > nms_iou), then the
    first ``top_k``. Accepts numpy arrays or torch tensors; returns float64 numpy; no state.
    """
    spans, logits, durations = (
        as_numpy("spans", spans),
        as_numpy("logits", logits),
        as_numpy("durations", durations),
    )
    if spans.ndim != 3 or spans.shape[-1] != 2:
        raise InputError(f"spans has shape {spans.shape}; expected (B, Q, 2) cxw normalised spans")
    if logits.shape != spans.shape[:2]:
        raise InputError(f"logits has shape {logits.shape}; expected (B, Q) = {spans.shape[:2]}")
    if durations.shape != spans.shape[:1]:
        raise InputError(
            f"durations has shape {durations.shape}; expected (B,) = ({spans.shape[0]},) seconds"
        )
    if not (np.isfinite(durations).all() and (durations > 0).all()):
        raise InputError(f"durations {durations.tolist()} must be finite and > 0 seconds")
    if top_k is not None and top_k < 1:
        raise InputError(f"top_k is {top_k}; expected None or >= 1")
    if nms_iou is not None and not 0 <= nms_iou <= 1:
        raise InputError(f"nms_iou is {nms_iou}; expected None or a value in [0, 1]")

    scores = 0.5 * (1 + np.tanh(0.5 * logits))  # stable sigmoid
    c, w = spans[..., 0], np.maximum(spans[..., 1], 0)
    d = durations[:, None]
    start = np.clip((c - 0.5 * w) * d, 0, d)
    end = np.clip((c + 0.5 * w) * d, 0, d)
    out = []
    for b in range(len(spans)):
        order = np.argsort(-scores[b], kind="stable")
        win = np.stack([start[b], end[b], scores[b]], axis=1)[order]
        if nms_iou is not None:
            win = temporal_nms(win, nms_iou)
        out.append(win[:top_k] if top_k is not None else win)
    return out
