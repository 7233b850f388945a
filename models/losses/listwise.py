"""Listwise objective: RSC relevance + Smooth-NDCG, mixed with Triplet-HN (see `xmr.models.losses`).

"Integrating Listwise Ranking into Pairwise-based Image-Text Retrieval" (Li et al.), checked against the
authors' public code (github.com/AAA-Zheng/Listwise_ITR, `model.py`, `TripletSNDCGLoss`):

Follows the authors' code:
- RSC (relevance score calculation): the relevance of image i to caption t is the *maximum* cosine
  between t's sentence embedding and those of image i's captions, mapped to [0, 1] as (1 + cos) / 2; a
  positive pair scores 1. The labels come from `image_text.relevance` with `kind="rsc"` (this loss's
  `label_kind`); `rsc_relevance` sets the positives to 1. The code has no grading or quantisation of the
  scores: they stay continuous (`levels=None`; `levels` is an option of ours, off by default).
- S-NDCG: smooth rank `r_i = 1 + sum_{j != i} sigmoid((s_j - s_i) / tau)`, gain `2^rel - 1`, discount
  `log2(1 + r_i)`, loss `1 - DCG / IDCG` per anchor, averaged over anchors, both directions; tau = 0.01.
- Pairwise part: VSE++ Triplet-HN, margin 0.2.
- Mixing: `(1 - w) * pairwise + w * listwise`.

Reconstructed or different, on purpose:
- w = 0.5: the code reads `opt.sndcg_weight` but its `train.py` never defines that option, so no default
  is published. 0.5 weighs both parts equally (and, Adam being invariant to the loss's scale, trains
  like the former `pairwise + 1.0 * listwise`).
- Directions are summed (the package's convention); the code averages them, a constant factor of 2.
- The text-to-image direction uses the transposed relevance (caption as the anchor, images as the
  candidates); the code reuses the image-to-text matrix there, which reads as a transposition slip.
- IDCG sorts the gains; the code ranks tied relevances equally (the same value without ties).
- `k` (a smooth NDCG@k cut-off) is ours, off by default.
"""

from __future__ import annotations

import torch
from torch import nn

from xmr.models.losses.mining import default_pos_mask
from xmr.models.losses.pairwise import TripletHN, both_directions, check_relevance


def rsc_relevance(relevance: torch.Tensor, pos_mask: torch.Tensor, levels: int | None = None) -> torch.Tensor:
    """The relevance score of every candidate: 1 for positives, the continuous RSC label (already
    (1 + max cos) / 2, in [0, 1]) for the others; quantised to `levels` grades (0, 1/levels, ..., 1) only
    when `levels` is given (our option; the authors keep the scores continuous)."""
    rel = relevance.clamp(0.0, 1.0)
    if levels:
        rel = torch.round(rel * levels) / levels
    return torch.where(pos_mask, torch.ones_like(rel), rel)


def smooth_ndcg_rows(sim: torch.Tensor, relevance: torch.Tensor, tau: float, k: int | None) -> torch.Tensor:
    """(Q,) Smooth-NDCG of each row: ranks replaced by sigmoid-smoothed ranks (-> exact NDCG as tau -> 0)."""
    c = sim.shape[1]
    diff = (sim.unsqueeze(1) - sim.unsqueeze(2)) / tau  # [q, i, j] = (s_j - s_i) / tau
    off_diag = ~torch.eye(c, dtype=torch.bool, device=sim.device)
    ranks = 1.0 + (torch.sigmoid(diff) * off_diag).sum(dim=2)  # (Q, C)
    gains = torch.pow(2.0, relevance) - 1.0
    dcg_terms = gains / torch.log2(1.0 + ranks)
    ideal = torch.sort(gains, dim=1, descending=True).values / torch.log2(
        torch.arange(2, c + 2, dtype=sim.dtype, device=sim.device)
    )
    if k is not None:
        dcg_terms = dcg_terms * torch.sigmoid((k + 0.5 - ranks) / tau)  # smooth "rank <= k"
        ideal = ideal[:, :k]
    idcg = ideal.sum(dim=1)
    return torch.where(idcg > 0, dcg_terms.sum(dim=1) / idcg.clamp_min(1e-12), torch.ones_like(idcg))


class SmoothNDCGLoss(nn.Module):
    """1 - Smooth-NDCG over each anchor's candidate list, graded by `relevance`."""

    needs_relevance = True
    label_kind = "rsc"

    def __init__(self, tau: float = 0.01, k: int | None = None, reduction: str = "mean"):
        super().__init__()
        self.tau, self.k, self.reduction = tau, k, reduction

    def forward(self, sim, relevance, pos_mask=None):
        relevance = check_relevance(sim, relevance)
        rows = 1.0 - smooth_ndcg_rows(sim, relevance, self.tau, self.k)
        cols = 1.0 - smooth_ndcg_rows(sim.T, relevance.T, self.tau, self.k)
        return both_directions(rows, cols, self.reduction)


class ListwiseLoss(nn.Module):
    """Listwise ranking integrated into pairwise ITR: (1 - w) Triplet-HN + w (1 - S-NDCG) on RSC labels."""

    needs_relevance = True
    label_kind = "rsc"

    def __init__(
        self,
        margin: float = 0.2,
        tau: float = 0.01,
        k: int | None = None,
        weight: float = 0.5,
        levels: int | None = None,
        reduction: str = "mean",
    ):
        super().__init__()
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"weight={weight}; the listwise share must be in [0, 1]")
        self.pairwise = TripletHN(margin, reduction=reduction)
        self.listwise = SmoothNDCGLoss(tau, k, reduction)
        self.weight, self.levels = weight, levels

    def forward(self, sim, relevance, pos_mask=None):
        pos = default_pos_mask(sim, pos_mask)
        graded = rsc_relevance(check_relevance(sim, relevance), pos, self.levels)
        return (1.0 - self.weight) * self.pairwise(sim, pos) + self.weight * self.listwise(sim, graded)
