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
    hardest_in_windows,
    hardest_negatives,
    positive_index,
    selective_negatives,
    sliding_windows,
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

    Per anchor row, a pair (j, k) of candidates costs `-tanh((c_j - c_k) / tau_label) tanh((s_j - s_k) /
    tau_sim)`: a differentiable stand-in for Kendall's tau (-1 when the two orders agree, +1 when reversed,
    0 for a tie in the labels). Without a window the row's loss is the mean over all pairs j < k
    (O(C^2) per anchor).

    With a window (BCLS's SW-HS), the row's loss is the mean over the sliding windows of the hardest pair
    of each window (`mining.sliding_windows`, `mining.hardest_in_windows`):
    - SW (sliding window, the paper): candidates sorted by label; window `a` holds the pairs (a, a + d),
      d = 1 .. window, in that order, so only candidates of close labels are compared. Pairs far apart in
      label order are left out: their order is already implied by the close ones, and the pseudo labels
      are noisy, so pairing distant candidates mostly repeats the same (possibly wrong) comparison.
    - HS (hard sampling, the paper): in each window only the hardest pair counts. The paper says "hard
      samples" without a formula; we define hardness as the pair's own loss term above (the pair whose
      similarities disagree most with the labels' order, a tie in labels counting 0), and keep exactly one
      pair per window, whether misordered or not: a window already in order contributes its
      least-satisfied pair, whose tanh is near saturation and gives little gradient. This keeps C - 1
      pairs per anchor, the same order as the triplet loss's C negatives (the paper's complexity claim),
      about 1/window of the pairs the windows hold; keeping every misordered pair instead would keep about
      half of them on random scores, which selects nothing.
    A row with fewer than two candidates has no pair: its loss is 0 (with a zero gradient).
    """

    needs_relevance = True
    label_kind = "bcls"  # the continuous labels it learns from (`image_text.relevance.LABEL_KINDS`)

    def __init__(
        self,
        tau_label: float = 0.05,
        tau_sim: float = 0.05,
        window: int | None = None,
        reduction: str = "mean",
    ):
        super().__init__()
        self.tau_label, self.tau_sim, self.window, self.reduction = tau_label, tau_sim, window, reduction

    def terms(self, sim: torch.Tensor, relevance: torch.Tensor, hi: torch.Tensor, lo: torch.Tensor):
        """Per-pair loss terms for column indices hi, lo of any shape (Q, ...)."""
        q = sim.shape[0]

        def take(x, idx):
            return x.gather(1, idx.reshape(q, -1)).reshape(idx.shape)

        dc = (take(relevance, hi) - take(relevance, lo)) / self.tau_label
        ds = (take(sim, hi) - take(sim, lo)) / self.tau_sim
        return -torch.tanh(dc) * torch.tanh(ds)

    def rows(self, sim: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
        c = sim.shape[1]
        if self.window is None:
            dc = (relevance.unsqueeze(2) - relevance.unsqueeze(1)) / self.tau_label  # (Q, C, C)
            ds = (sim.unsqueeze(2) - sim.unsqueeze(1)) / self.tau_sim
            upper = torch.triu(torch.ones(c, c, dtype=torch.bool, device=sim.device), diagonal=1)
            return -(torch.tanh(dc) * torch.tanh(ds))[:, upper].sum(dim=1) / max(1, c * (c - 1) // 2)
        hi, lo, valid = sliding_windows(relevance, self.window)  # (Q, S, W)
        if hi.shape[1] == 0:  # fewer than two candidates: no pair, loss 0 (still part of the graph)
            return (sim * 0.0).sum(dim=1)
        terms = self.terms(sim, relevance, hi, lo)
        hardest = terms.gather(2, hardest_in_windows(terms.detach(), valid)).squeeze(2)  # (Q, S)
        return hardest.sum(dim=1) / max(1, hardest.shape[1])

    def forward(self, sim: torch.Tensor, relevance: torch.Tensor, pos_mask: torch.Tensor | None = None):
        relevance = check_relevance(sim, relevance)
        return both_directions(self.rows(sim, relevance), self.rows(sim.T, relevance.T), self.reduction)


class BCLS(nn.Module):
    """Binary and continuous label supervision: Triplet-SN on pairs + lambda * Kendall (SW-HS) on labels."""

    needs_relevance = True
    label_kind = "bcls"

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
