"""Moment retrieval metrics as the QVHighlights evaluation computes them (numpy): R1@IoU, mAP, mIoU.

Predictions are (K, 3) [start_s, end_s, score] arrays per query, best first; ground truth is a list of
[start_s, end_s] windows per query. `random_span_baseline` is the chance reference every figure is read
against.
"""

from __future__ import annotations

import numpy as np

from xmr.models.errors import InputError
from xmr.models.moments.spans import as_numpy, temporal_iou_np

IOU_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))  # 0.5:0.05:0.95, QVHighlights mAP
R1_THRESHOLDS = (0.5, 0.7)


def _average_precision(pred: np.ndarray, gt: np.ndarray, threshold: float) -> float:
    """QVHighlights / ActivityNet AP of score-sorted (K, 3) predictions against (G, 2) windows.

    Each prediction, in rank order, is a true positive if its highest-IoU GT window not yet taken has
    IoU >= threshold (that window is then taken), otherwise a false positive; AP is the area under the
    precision-recall curve with precision made monotone (``interpolated_precision_recall``), recall over G.
    """
    if len(pred) == 0:
        return 0.0
    ious = temporal_iou_np(pred[:, :2], gt)  # (K, G)
    taken = np.zeros(len(gt), dtype=bool)
    tp = np.zeros(len(pred))
    for k in range(len(pred)):
        for g in np.argsort(-ious[k], kind="stable"):
            if ious[k, g] < threshold:
                break
            if not taken[g]:
                taken[g], tp[k] = True, 1.0
                break
    tp_cum = np.cumsum(tp)
    precision = tp_cum / np.arange(1, len(pred) + 1)
    recall = tp_cum / len(gt)
    mprec = np.concatenate([[0.0], precision, [0.0]])
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mprec = np.maximum.accumulate(mprec[::-1])[::-1]
    idx = np.nonzero(mrec[1:] != mrec[:-1])[0] + 1
    return float(np.sum((mrec[idx] - mrec[idx - 1]) * mprec[idx]))


def moment_metrics(
    predictions: list[np.ndarray], ground_truth: list[list], max_pred_windows: int | None = 10
) -> dict[str, float]:
    """QVHighlights moment-retrieval metrics, all in percent (0-100).

    - ``R1@0.5``, ``R1@0.7``: % of queries whose top-1 prediction has IoU >= thr with some GT window
      (its best-matching window; >= as in the official eval, so IoU exactly 0.5 counts).
    - ``mIoU``: mean over queries of the top-1 prediction's best IoU with any GT window.
    - ``mAP@0.5``, ``mAP@0.75``: mean over queries of the per-query AP (`_average_precision`, each GT window
      matched at most once) at that IoU threshold; ``mAP``: the mean of the per-threshold mAPs over
      0.5:0.05:0.95. Only the first ``max_pred_windows`` predictions count (official default 10).
    Predictions are re-sorted by score (stable), so already-sorted inputs are unchanged. A query with no
    predictions scores 0 everywhere; every query needs at least one GT window.
    """
    if len(predictions) != len(ground_truth):
        raise InputError(
            f"predictions has {len(predictions)} queries but ground_truth has {len(ground_truth)}; "
            "expected one entry per query in both"
        )
    if not predictions:
        raise InputError("predictions is empty; expected at least one query")
    r1 = {t: [] for t in R1_THRESHOLDS}
    ap = {t: [] for t in IOU_THRESHOLDS}
    miou = []
    for q, (pred, gt) in enumerate(zip(predictions, ground_truth, strict=True)):
        pred = as_numpy(f"predictions[{q}]", pred).reshape(-1, 3) if len(pred) else np.zeros((0, 3))
        gt = as_numpy(f"ground_truth[{q}]", gt)
        if gt.ndim != 2 or gt.shape[-1] != 2 or len(gt) == 0:
            raise InputError(
                f"ground_truth[{q}] has shape {gt.shape}; expected (G >= 1, 2) [start, end] windows"
            )
        pred = pred[np.argsort(-pred[:, 2], kind="stable")][:max_pred_windows]
        best = float(temporal_iou_np(pred[:1, :2], gt).max()) if len(pred) else 0.0
        miou.append(best)
        for t in R1_THRESHOLDS:
            r1[t].append(best >= t)
        for t in IOU_THRESHOLDS:
            ap[t].append(_average_precision(pred, gt, t))
    map_t = {t: 100.0 * float(np.mean(v)) for t, v in ap.items()}
    return {
        "R1@0.5": 100.0 * float(np.mean(r1[0.5])),
        "R1@0.7": 100.0 * float(np.mean(r1[0.7])),
        "mAP@0.5": map_t[0.5],
        "mAP@0.75": map_t[0.75],
        "mAP": float(np.mean(list(map_t.values()))),
        "mIoU": 100.0 * float(np.mean(miou)),
    }


def random_span_baseline(durations, n_per_query: int = 10, seed: int = 0) -> list[np.ndarray]:
    """Per query ``n_per_query`` spans with uniform endpoints in [0, duration] and uniform scores, sorted."""
    durations = as_numpy("durations", durations).reshape(-1)
    if n_per_query < 1:
        raise InputError(f"n_per_query is {n_per_query}; expected >= 1")
    rng = np.random.default_rng(seed)
    out = []
    for d in durations:
        ends = np.sort(rng.uniform(0, d, size=(n_per_query, 2)), axis=1)
        scores = rng.uniform(size=n_per_query)
        win = np.concatenate([ends, scores[:, None]], axis=1)
        out.append(win[np.argsort(-scores, kind="stable")])
    return out
