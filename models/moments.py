"""Video moment retrieval head utilities: span algebra, Hungarian matching, losses, decoding and metrics.

Follows Moment-DETR (Lei et al., "QVHighlights: Detecting Moments and Highlights in Videos via Natural
Language Queries", NeurIPS 2021) and its public QVHighlights evaluation, which CDNet's head reuses
(see ../shared/SEEDS.md "CDNet").

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

What is reconstructed rather than taken from Moment-DETR's code:
- the class loss is a binary cross-entropy on the one logit (matched queries target 1 with weight 1,
  unmatched target 0 with weight ``eos_coef``, averaged over all B x Q queries, as Moment-DETR averages its
  weighted two-way cross-entropy); ``class_loss="focal"`` multiplies each term by ``(1 - p_t) ** 2``;
- the saliency hinge uses *every* (positive, negative) clip pair of a video instead of Moment-DETR's 2
  sampled pairs (deterministic; same fixed point). Positives are the real clips whose centre lies in a
  target span (plus the clip holding each span's centre, so a span shorter than a clip still has one);
  negatives are the other real clips. Moment-DETR's ``* 2`` rescaling is dropped;
- zero-length spans: IoU denominators are floored at 1e-9, so an empty span has IoU 0 with anything.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from xmr.models.errors import InputError

_EPS = 1e-9
IOU_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))  # 0.5:0.05:0.95, QVHighlights mAP
R1_THRESHOLDS = (0.5, 0.7)


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
    return inter / union.clamp(min=_EPS), union


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
    hull = (torch.max(a[:, None, 1], b[None, :, 1]) - torch.min(a[:, None, 0], b[None, :, 0])).clamp(min=_EPS)
    return iou - (hull - union) / hull


# ---------------------------------------------------------------------------------------------------------
# matching and losses


def _check_head(pred_spans: torch.Tensor, pred_logits: torch.Tensor, targets: list) -> None:
    if pred_spans.ndim != 3 or pred_spans.shape[-1] != 2:
        raise InputError(f"pred_spans has shape {tuple(pred_spans.shape)}; expected (B, Q, 2) cxw spans")
    if tuple(pred_logits.shape) != tuple(pred_spans.shape[:2]):
        raise InputError(
            f"pred_logits has shape {tuple(pred_logits.shape)}; "
            f"expected (B, Q) = {tuple(pred_spans.shape[:2])}"
        )
    if len(targets) != pred_spans.shape[0]:
        raise InputError(f"targets has {len(targets)} entries; expected one (n_i, 2) tensor per video (B)")
    for i, t in enumerate(targets):
        if t.ndim != 2 or t.shape[-1] != 2:
            raise InputError(f"targets[{i}] has shape {tuple(t.shape)}; expected (n_i, 2) cxw spans")


@torch.no_grad()
def hungarian_match(
    pred_spans: torch.Tensor,
    pred_logits: torch.Tensor,
    targets: list[torch.Tensor],
    span_l1: float = 10.0,
    giou: float = 1.0,
    cls: float = 4.0,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Optimal one-to-one query/target assignment per video (Moment-DETR's HungarianMatcher).

    Cost (Q, n_i) = span_l1 * L1(cxw, cxw) - giou * gIoU(xx, xx) - cls * sigmoid(logit), minimised by
    ``scipy.optimize.linear_sum_assignment``. Returns per video ``(pred_idx, tgt_idx)`` int64 tensors of
    length min(Q, n_i), ordered by ``pred_idx``.
    """
    _check_head(pred_spans, pred_logits, targets)
    out = []
    for spans, logits, tgt in zip(pred_spans.float(), pred_logits.float(), targets, strict=True):
        tgt = tgt.float().to(spans.device)
        cost = (
            span_l1 * torch.cdist(spans, tgt, p=1)
            - giou * generalized_temporal_iou(span_cxw_to_xx(spans), span_cxw_to_xx(tgt))
            - cls * logits.sigmoid()[:, None]
        )
        rows, cols = linear_sum_assignment(cost.cpu().numpy())
        out.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
    return out


def saliency_hinge(
    saliency: torch.Tensor, clip_mask: torch.Tensor, targets: list[torch.Tensor], margin: float = 0.2
) -> torch.Tensor:
    """Mean over videos of mean_{pos p, neg n} max(0, margin + s_n - s_p); see the module docstring."""
    if saliency.ndim != 2 or tuple(clip_mask.shape) != tuple(saliency.shape):
        raise InputError(
            f"saliency {tuple(saliency.shape)} and clip_mask {tuple(clip_mask.shape)}; expected both (B, T)"
        )
    if len(targets) != saliency.shape[0]:
        raise InputError(
            f"targets has {len(targets)} entries; expected one per video (B = {saliency.shape[0]})"
        )
    mask = clip_mask.bool()
    n_valid = mask.sum(1)  # (B,)
    T = saliency.shape[1]
    losses = []
    for b, tgt in enumerate(targets):
        if len(tgt) == 0 or n_valid[b] == 0:
            continue
        tv = n_valid[b].to(saliency.dtype)
        centres = (torch.arange(T, device=saliency.device, dtype=saliency.dtype) + 0.5) / tv  # (T,)
        xx = span_cxw_to_xx(tgt.to(saliency))  # (n, 2)
        pos = ((centres[:, None] >= xx[None, :, 0]) & (centres[:, None] <= xx[None, :, 1])).any(1)
        holder = (tgt[:, 0].to(saliency) * tv).floor().long().clamp(0, int(n_valid[b]) - 1)
        pos[holder] = True
        pos &= mask[b]
        neg = mask[b] & ~pos
        if pos.any() and neg.any():
            s = saliency[b]
            losses.append((margin + s[neg][None, :] - s[pos][:, None]).clamp(min=0).mean())
    if not losses:
        return saliency.sum() * 0.0
    return torch.stack(losses).mean()


class MomentLoss(nn.Module):
    """Moment-DETR's set loss + saliency hinge: ``forward(outputs, targets) -> (loss, parts)``.

    ``outputs``: "spans" (B, Q, 2) cxw normalised, "logits" (B, Q) foreground logits, optionally
    "saliency" (B, T) per-clip scores with "clip_mask" (B, T) bool (all clips real when absent).
    ``targets``: B tensors (n_i, 2) cxw normalised. ``loss`` = span_l1 * L1 + giou * (1 - gIoU) + cls * class
    + saliency * hinge; span terms average over all matched pairs of the batch. ``parts`` holds the
    unweighted, detached terms "span_l1", "giou", "cls", "saliency". Matching uses the same weights.
    """

    CLASS_LOSSES = ("bce", "focal")

    def __init__(
        self,
        span_l1: float = 10.0,  # Moment-DETR span_loss_coef
        giou: float = 1.0,  # giou_loss_coef
        cls: float = 4.0,  # label_loss_coef
        saliency: float = 1.0,  # lw_saliency
        eos_coef: float = 0.1,  # weight of the "no object" class for unmatched queries (DETR)
        saliency_margin: float = 0.2,
        class_loss: str = "bce",
    ):
        super().__init__()
        if class_loss not in self.CLASS_LOSSES:
            raise InputError(f"class_loss {class_loss!r} is unknown; expected one of {self.CLASS_LOSSES}")
        self.span_l1, self.giou, self.cls, self.saliency = span_l1, giou, cls, saliency
        self.eos_coef, self.saliency_margin, self.class_loss = eos_coef, saliency_margin, class_loss

    def forward(self, outputs: dict, targets: list[torch.Tensor]) -> tuple[torch.Tensor, dict]:
        for key in ("spans", "logits"):
            if key not in outputs:
                raise InputError(f"outputs has no {key!r}; expected keys 'spans', 'logits' (+ 'saliency')")
        spans, logits = outputs["spans"], outputs["logits"]
        targets = [t.to(spans) for t in targets]
        indices = hungarian_match(spans, logits, targets, self.span_l1, self.giou, self.cls)

        labels = torch.zeros_like(logits)
        src, tgt = [], []
        for b, (qi, ti) in enumerate(indices):
            labels[b, qi] = 1.0
            src.append(spans[b, qi])
            tgt.append(targets[b][ti])
        src, tgt = torch.cat(src), torch.cat(tgt)  # (P, 2) matched pairs
        if len(src):
            l_span = F.l1_loss(src, tgt)
            l_giou = (
                1 - torch.diag(generalized_temporal_iou(span_cxw_to_xx(src), span_cxw_to_xx(tgt)))
            ).mean()
        else:
            l_span = l_giou = spans.sum() * 0.0

        weight = torch.where(labels > 0, 1.0, self.eos_coef)
        l_cls = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
        if self.class_loss == "focal":
            p_t = torch.where(labels > 0, logits.sigmoid(), 1 - logits.sigmoid())
            l_cls = l_cls * (1 - p_t) ** 2
        l_cls = (weight * l_cls).mean()

        if "saliency" in outputs:
            sal = outputs["saliency"]
            mask = outputs.get("clip_mask", torch.ones_like(sal, dtype=torch.bool))
            l_sal = saliency_hinge(sal, mask, targets, self.saliency_margin)
        else:
            l_sal = logits.sum() * 0.0

        loss = self.span_l1 * l_span + self.giou * l_giou + self.cls * l_cls + self.saliency * l_sal
        parts = {"span_l1": l_span, "giou": l_giou, "cls": l_cls, "saliency": l_sal}
        return loss, {k: v.detach() for k, v in parts.items()}


# ---------------------------------------------------------------------------------------------------------
# decoding (numpy; shared with the Triton server)


def _np_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, 2) x (M, 2) (start, end) -> (N, M) IoU, float64 numpy twin of `temporal_iou`."""
    inter = np.clip(
        np.minimum(a[:, None, 1], b[None, :, 1]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None
    )
    union = (a[:, 1] - a[:, 0])[:, None] + (b[:, 1] - b[:, 0])[None, :] - inter
    return inter / np.maximum(union, _EPS)


def _as_numpy(name: str, x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise InputError(f"{name} is not numeric ({e})") from e


def temporal_nms(windows: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy NMS on score-sorted (K, 3) windows: drop a window whose IoU with a kept one is > threshold."""
    keep: list[int] = []
    for i in range(len(windows)):
        if not keep or _np_iou(windows[i : i + 1, :2], windows[keep, :2]).max() <= iou_threshold:
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
        _as_numpy("spans", spans),
        _as_numpy("logits", logits),
        _as_numpy("durations", durations),
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


# ---------------------------------------------------------------------------------------------------------
# metrics (numpy)


def _average_precision(pred: np.ndarray, gt: np.ndarray, threshold: float) -> float:
    """QVHighlights / ActivityNet AP of score-sorted (K, 3) predictions against (G, 2) windows.

    Each prediction, in rank order, is a true positive if its highest-IoU GT window not yet taken has
    IoU >= threshold (that window is then taken), otherwise a false positive; AP is the area under the
    precision-recall curve with precision made monotone (``interpolated_precision_recall``), recall over G.
    """
    if len(pred) == 0:
        return 0.0
    ious = _np_iou(pred[:, :2], gt)  # (K, G)
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
        pred = _as_numpy(f"predictions[{q}]", pred).reshape(-1, 3) if len(pred) else np.zeros((0, 3))
        gt = _as_numpy(f"ground_truth[{q}]", gt)
        if gt.ndim != 2 or gt.shape[-1] != 2 or len(gt) == 0:
            raise InputError(
                f"ground_truth[{q}] has shape {gt.shape}; expected (G >= 1, 2) [start, end] windows"
            )
        pred = pred[np.argsort(-pred[:, 2], kind="stable")][:max_pred_windows]
        best = float(_np_iou(pred[:1, :2], gt).max()) if len(pred) else 0.0
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
    durations = _as_numpy("durations", durations).reshape(-1)
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
