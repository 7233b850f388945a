"""Moment-DETR's set prediction head: Hungarian matching of predicted spans to targets, and the loss.

Follows Moment-DETR (Lei et al., "QVHighlights", NeurIPS 2021): span L1 + generalised IoU + class terms
(weights 10 / 1 / 4) on the Hungarian-matched queries, plus a saliency hinge over the clips.

What is reconstructed rather than taken from Moment-DETR's code:
What is reconstructed rather than taken from Moment-DETR's code:
- the class loss is a binary cross-entropy on the one logit (matched queries target 1 with weight 1,
  unmatched target 0 with weight ``eos_coef``, averaged over all B x Q queries, as Moment-DETR averages its
  weighted two-way cross-entropy); ``class_loss="focal"`` multiplies each term by ``(1 - p_t) ** 2``;
- the saliency hinge uses *every* (positive, negative) clip pair of a video instead of Moment-DETR's 2
  sampled pairs (deterministic; same fixed point). Positives are the real clips whose centre lies in a
  target span (plus the clip holding each span's centre, so a span shorter than a clip still has one);
  negatives are the other real clips. Moment-DETR's ``* 2`` rescaling is dropped;
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from xmr.models.errors import InputError
from xmr.models.moments.spans import generalized_temporal_iou, span_cxw_to_xx


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
