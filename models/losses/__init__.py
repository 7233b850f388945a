"""Retrieval losses over a similarity matrix: four image-text objectives and their baselines.

One signature: `loss(sim, pos_mask=None)`, or `loss(sim, relevance, pos_mask=None)` for the losses that
learn from continuous labels (`needs_relevance = True`: kendall, bcls, listwise). `sim` is (Q, C), higher =
closer; `pos_mask` marks positives (default: the diagonal of a paired batch); `relevance` (Q, C) holds
continuous labels in [0, 1] (`xmr.models.image_text.relevance`). Both directions (rows as anchors, then
columns as anchors, on `sim.T`) are computed from the same `sim` and **summed**; `reduction="mean"`
averages over the anchors of each direction, "sum" sums, "none" returns the per-anchor values (rows, then
columns). Mining (hardest / selective / soft negatives, sliding-window pairs) lives in `mining.py`; the
pairwise losses in `pairwise.py`, the listwise one in `listwise.py`. Every loss constructs with no
arguments: the papers' defaults, or ours where a paper gives none (marked "reconstructed").

Papers (what follows the paper, what is reconstructed, the defaults):
- VSE++ Triplet-HN: `[m - s(p) + s(hardest n)]_+`, m = 0.2 (VSE++ paper's default). Follows the paper.
- SelHN (RVSE++ = RVSE + SelHN, the default objective of `xmr train rvse`): per anchor, all negatives
  (Triplet-SH) when the gradient-vanishing condition holds, else the hardest (Triplet-HN). The paper says
  gradients vanish "when the difference between the positive pair similarity and the negative pair
  similarity is close to 0"; reconstructed as `|s(p) - s(hardest n)| < threshold`, threshold = 0.1
  (strict: the hardest negative is used at exactly the threshold), margin 0.2.
- BCLS: Triplet-SN (negatives weighted by softmax(s_n / tau), tau = 0.1, reconstructed), Kendall ranking
  loss `-mean_{pairs} tanh((c_j - c_k) / tau_c) tanh((s_j - s_k) / tau_s)` (tau_c = tau_s = 0.05,
  reconstructed), SW-HS (window 8): candidates sorted by label, one window per start position holding
  the pairs (a, a + 1 .. a + 8), and only the hardest pair of each window (the largest Kendall term; the
  paper names hard sampling without a formula, so the hardness measure is ours): C - 1 pairs per anchor,
  the triplet loss's order (`KendallRankLoss`). BCLS = Triplet-SN + lambda Kendall, lambda = 0.1
  (measured on Shapes, 1000 images x 2 epochs, val rSum: Triplet-SN alone 55, lambda = 1 13, lambda = 0.1
  67: at lambda = 1 the steep label-order term swamps the binary one early in training; measured before
  SW-HS selected hard pairs). Labels: mean sentence-embedding cosine to the image's captions (MiniLM by
  default; `image_text.relevance`, kind "bcls").
- Unified loss: `tau log(1 + sum_n exp((s_n - s_p + m) / tau))` per positive; tau -> 0 gives Triplet-HN with
  margin m, m = 0 gives tau x InfoNCE (the VLC loss). Defaults tau = 0.05, m = 0.2 (reconstructed).
- InfoNCE / VLC: `-log softmax` of the positive among the positive and the negatives, tau = 0.05.
- Listwise ITR (RSC + Smooth-NDCG), following the authors' code (details in `listwise.py`): RSC labels
  `(1 + max cos) / 2` over the image's captions (kind "rsc"), positives 1, continuous (no grading);
  smooth rank `r_i = 1 + sum_{j != i} sigmoid((s_j - s_i) / tau)`, `DCG = sum_i (2^rel_i - 1) / log2(1 +
  r_i)`, S-NDCG loss `1 - DCG / IDCG` (tau = 0.01); mixed as `(1 - w) Triplet-HN + w S-NDCG`, w = 0.5
  (the code publishes no default).

Degenerate batches (one image, with one caption or several) give a finite loss and gradient for every
loss: an anchor with no negative or no pair contributes 0.
"""

from __future__ import annotations

from torch import nn

from xmr.models.losses.listwise import ListwiseLoss, SmoothNDCGLoss
from xmr.models.losses.pairwise import (
    BCLS,
    InfoNCE,
    KendallRankLoss,
    SelHN,
    TripletHN,
    TripletSN,
    UnifiedLoss,
)

LOSSES: dict[str, type[nn.Module]] = {
    "triplet_hn": TripletHN,
    "selhn": SelHN,
    "triplet_sn": TripletSN,
    "kendall": KendallRankLoss,
    "bcls": BCLS,
    "unified": UnifiedLoss,
    "infonce": InfoNCE,
    "listwise": ListwiseLoss,
}


def make_loss(name: str, **kwargs) -> nn.Module:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid: {', '.join(LOSSES)}")
    return LOSSES[name](**kwargs)


__all__ = ["LOSSES", "make_loss", "SmoothNDCGLoss", *(cls.__name__ for cls in LOSSES.values())]
