"""Pairwise objectives: hinge triplets (hardest, selective, soft negatives), the unified loss, InfoNCE, and
the Kendall rank loss with its BCLS combination. The papers and the defaults are listed in the package
docstring (`xmr.models.losses`).
"""

from __future__ import annotations

import torch
from torch import nn

from xmr.models.losses.mining import (
    all_negatives,
    default_pos_mask,
    hardest_negatives,
    misordered_pairs,
    positive_index,
    selective_negatives,
    sliding_window_pairs,
    soft_negative_weights,
)


def reduce(per_anchor: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_anchor.mean()
    if reduction == "sum":
        return per_anchor.sum()
    if reduction == "none":
        return per_anchor
    raise ValueError(f"reduction={reduction!r}; expected 'mean', 'sum' or 'none'")


def both_directions(rows: torch.Tensor, cols: torch.Tensor, reduction: str) -> torch.Tensor:
    """Sum of the two directions, each reduced over its own anchors; "none" concatenates them."""
    if reduction == "none":
        return torch.cat([rows, cols])
    return reduce(rows, reduction) + reduce(cols, reduction)


def check_relevance(sim: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    if relevance is None or relevance.shape != sim.shape:
        got = None if relevance is None else tuple(relevance.shape)
        raise ValueError(f"relevance is {got}; expected continuous labels shaped like sim {tuple(sim.shape)}")
    return relevance.to(sim.dtype)


def positive_scores(sim: torch.Tensor, pos_mask: torch.Tensor) -> torch.Tensor:
    """(Q, 1) score of each row's positive."""
    return sim.gather(1, positive_index(pos_mask))


def hinge_rows(
    sim: torch.Tensor, pos_mask: torch.Tensor, neg_weights: torch.Tensor, margin: float
) -> torch.Tensor:
    """Per row: sum over negatives n of w_n [margin - s(p) + s(n)]_+ -> (Q,)."""
    hinge = (margin - positive_scores(sim, pos_mask) + sim).clamp_min(0.0)
    return (hinge * neg_weights).sum(dim=1)


class PairLoss(nn.Module):
    """A loss computed per anchor row by `rows(sim, pos_mask)`, then on the transpose, then summed."""

    needs_relevance = False

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        self.reduction = reduction

    def rows(self, sim: torch.Tensor, pos_mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, sim: torch.Tensor, pos_mask: torch.Tensor | None = None) -> torch.Tensor:
        pos = default_pos_mask(sim, pos_mask)
        return both_directions(self.rows(sim, pos), self.rows(sim.T, pos.T), self.reduction)


class TripletHN(PairLoss):
    """VSE++ triplet loss with the hardest negative (max violation); `hardest=False`: sum over all (SH)."""

    def __init__(self, margin: float = 0.2, hardest: bool = True, reduction: str = "mean"):
        super().__init__(reduction)
        self.margin, self.hardest = margin, hardest

    def rows(self, sim, pos):
        mine = hardest_negatives if self.hardest else all_negatives
        return hinge_rows(sim, pos, mine(sim, pos).to(sim.dtype), self.margin)


class SelHN(PairLoss):
    """Selectively hard negatives: Triplet-SH for anchors in the vanishing condition, Triplet-HN otherwise."""

    def __init__(self, margin: float = 0.2, threshold: float = 0.1, reduction: str = "mean"):
        super().__init__(reduction)
        self.margin, self.threshold = margin, threshold

    def rows(self, sim, pos):
        return hinge_rows(sim, pos, selective_negatives(sim, pos, self.threshold).to(sim.dtype), self.margin)


class TripletSN(PairLoss):
    """Triplet loss with soft negative mining: hinges weighted by softmax(s_n / tau) over the negatives."""

    def __init__(self, margin: float = 0.2, tau: float = 0.1, reduction: str = "mean"):
        super().__init__(reduction)
        self.margin, self.tau = margin, tau

    def rows(self, sim, pos):
        return hinge_rows(sim, pos, soft_negative_weights(sim, pos, self.tau), self.margin)


class UnifiedLoss(PairLoss):
    """Unified pair-similarity loss: tau * log(1 + sum_n exp((s_n - s_p + m) / tau))."""

    def __init__(self, tau: float = 0.05, margin: float = 0.2, reduction: str = "mean"):
        super().__init__(reduction)
        self.tau, self.margin = tau, margin

    def rows(self, sim, pos):
        logits = ((sim - positive_scores(sim, pos) + self.margin) / self.tau).masked_fill(pos, float("-inf"))
        zero = torch.zeros_like(logits[:, :1])  # the "1 +" inside the log
        return self.tau * torch.logsumexp(torch.cat([zero, logits], dim=1), dim=1)


class InfoNCE(PairLoss):
    """Vision-language contrastive loss (VLC): -log softmax of the positive among positive + negatives."""

    def __init__(self, tau: float = 0.05, reduction: str = "mean"):
        super().__init__(reduction)
        self.tau = tau

    def rows(self, sim, pos):
        p = positive_scores(sim, pos)
        logits = (sim / self.tau).masked_fill(pos, float("-inf"))  # negatives only
        return torch.logsumexp(torch.cat([p / self.tau, logits], dim=1), dim=1) - p.squeeze(1) / self.tau


class KendallRankLoss(nn.Module):
    """Kendall ranking loss between similarities and continuous labels; SW-HS when `window` is set.

    Per anchor row: `-mean over pairs (j, k) of tanh((c_j - c_k) / tau_label) * tanh((s_j - s_k) / tau_sim)`,
    a differentiable stand-in for Kendall's tau (-1 when the orders agree perfectly, +1 when reversed).
    Without a window every pair j < k counts (O(C^2) per anchor); with one, only sliding-window pairs whose
    similarities are misordered (O(C * window)).
    """

    needs_relevance = True

    def __init__(
        self,
        tau_label: float = 0.05,
        tau_sim: float = 0.05,
        window: int | None = None,
        reduction: str = "mean",
    ):
        super().__init__()
        self.tau_label, self.tau_sim, self.window, self.reduction = tau_label, tau_sim, window, reduction

    def rows(self, sim: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
        if self.window is None:
            dc = (relevance.unsqueeze(2) - relevance.unsqueeze(1)) / self.tau_label  # (Q, C, C)
            ds = (sim.unsqueeze(2) - sim.unsqueeze(1)) / self.tau_sim
            c = sim.shape[1]
            upper = torch.triu(torch.ones(c, c, dtype=torch.bool, device=sim.device), diagonal=1)
            return -(torch.tanh(dc) * torch.tanh(ds))[:, upper].mean(dim=1)
        hi, lo = sliding_window_pairs(relevance, self.window)
        keep = misordered_pairs(sim, hi, lo).to(sim.dtype)
        dc = (relevance.gather(1, hi) - relevance.gather(1, lo)) / self.tau_label
        ds = (sim.gather(1, hi) - sim.gather(1, lo)) / self.tau_sim
        return -(torch.tanh(dc) * torch.tanh(ds) * keep).sum(dim=1) / keep.sum(dim=1)

    def forward(self, sim: torch.Tensor, relevance: torch.Tensor, pos_mask: torch.Tensor | None = None):
        relevance = check_relevance(sim, relevance)
        return both_directions(self.rows(sim, relevance), self.rows(sim.T, relevance.T), self.reduction)


class BCLS(nn.Module):
    """Binary and continuous label supervision: Triplet-SN on pairs + lambda * Kendall (SW-HS) on labels."""

    needs_relevance = True

    def __init__(
        self,
        margin: float = 0.2,
        tau: float = 0.1,
        lam: float = 0.1,
        window: int | None = 8,
        reduction: str = "mean",
    ):
        super().__init__()
        self.binary = TripletSN(margin, tau, reduction)
        self.continuous = KendallRankLoss(window=window, reduction=reduction)
        self.lam = lam

    def forward(self, sim, relevance, pos_mask=None):
        return self.binary(sim, pos_mask) + self.lam * self.continuous(sim, relevance)
