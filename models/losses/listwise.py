"""Listwise objective: RSC relevance grading + Smooth-NDCG, added to Triplet-HN (see `xmr.models.losses`)."""

from __future__ import annotations

import torch
from torch import nn

from xmr.models.losses.mining import (
    default_pos_mask,
)
from xmr.models.losses.pairwise import TripletHN, both_directions, check_relevance


def rsc_relevance(relevance: torch.Tensor, pos_mask: torch.Tensor, levels: int | None = None) -> torch.Tensor:
    """RSC: the relevance score of every candidate: 1 for positives, the continuous label for the others,
    quantised to `levels` grades (0, 1/levels, ..., 1) when given."""
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

    def __init__(self, tau: float = 0.01, k: int | None = None, reduction: str = "mean"):
        super().__init__()
        self.tau, self.k, self.reduction = tau, k, reduction

    def forward(self, sim, relevance, pos_mask=None):
        relevance = check_relevance(sim, relevance)
        rows = 1.0 - smooth_ndcg_rows(sim, relevance, self.tau, self.k)
        cols = 1.0 - smooth_ndcg_rows(sim.T, relevance.T, self.tau, self.k)
        return both_directions(rows, cols, self.reduction)


class ListwiseLoss(nn.Module):
    """Listwise ranking integrated into pairwise ITR: Triplet-HN + lam * (1 - S-NDCG) on RSC relevance."""

    needs_relevance = True

    def __init__(
        self,
        margin: float = 0.2,
        tau: float = 0.01,
        k: int | None = None,
        lam: float = 1.0,
        levels: int | None = None,
        reduction: str = "mean",
    ):
        super().__init__()
        self.pairwise = TripletHN(margin, reduction=reduction)
        self.listwise = SmoothNDCGLoss(tau, k, reduction)
        self.lam, self.levels = lam, levels

    def forward(self, sim, relevance, pos_mask=None):
        pos = default_pos_mask(sim, pos_mask)
        graded = rsc_relevance(check_relevance(sim, relevance), pos, self.levels)
        return self.pairwise(sim, pos) + self.lam * self.listwise(sim, graded)
