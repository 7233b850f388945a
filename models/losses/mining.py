"""Negative and pair mining, kept apart from the losses (pytorch-metric-learning's separation).

A miner looks at a similarity matrix under `no_grad` and returns masks, weights or pair indices; a loss
consumes `sim` plus what the miner returned. Functions take `sim` (Q, C), higher = closer, and a boolean
`pos_mask` (Q, C); anchors are rows (transpose both for the other direction).
"""

from __future__ import annotations

import torch


def default_pos_mask(sim: torch.Tensor, pos_mask: torch.Tensor | None) -> torch.Tensor:
    """The diagonal of a paired batch unless a mask is given; checks the shape."""
    if pos_mask is None:
        if sim.shape[0] != sim.shape[1]:
            raise ValueError(f"sim is {tuple(sim.shape)}: a non-square sim needs an explicit pos_mask")
        return torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)
    if pos_mask.shape != sim.shape:
        raise ValueError(f"pos_mask is {tuple(pos_mask.shape)}; expected the shape of sim {tuple(sim.shape)}")
    return pos_mask.bool()


def positive_index(pos_mask: torch.Tensor) -> torch.Tensor:
    """(Q, 1) column of each row's positive (the first one when a row has several)."""
    if not bool(pos_mask.any(dim=1).all()):
        raise ValueError("every anchor needs at least one positive in pos_mask")
    return pos_mask.float().argmax(dim=1, keepdim=True)


@torch.no_grad()
def hardest_negatives(sim: torch.Tensor, pos_mask: torch.Tensor) -> torch.Tensor:
    """One-hot (Q, C) mask of each row's highest-scoring negative (VSE++'s max violation)."""
    hardest = sim.masked_fill(pos_mask, float("-inf")).argmax(dim=1, keepdim=True)
    return torch.zeros_like(pos_mask).scatter_(1, hardest, True) & ~pos_mask


@torch.no_grad()
def all_negatives(sim: torch.Tensor, pos_mask: torch.Tensor) -> torch.Tensor:
    """Every negative of each row (VSE's sum of hinges, Triplet-SH)."""
    return ~pos_mask


@torch.no_grad()
def vanishing_rows(sim: torch.Tensor, pos_mask: torch.Tensor, threshold: float) -> torch.Tensor:
    """(Q,) rows in SelHN's gradient-vanishing condition: |s(p) - s(hardest negative)| < threshold."""
    pos = sim.gather(1, positive_index(pos_mask)).squeeze(1)
    hardest = sim.masked_fill(pos_mask, float("-inf")).amax(dim=1)
    return (pos - hardest).abs() < threshold


@torch.no_grad()
def selective_negatives(sim: torch.Tensor, pos_mask: torch.Tensor, threshold: float) -> torch.Tensor:
    """SelHN: all negatives for rows in the vanishing condition, the hardest negative for the others."""
    vanishing = vanishing_rows(sim, pos_mask, threshold).unsqueeze(1)
    return torch.where(vanishing, all_negatives(sim, pos_mask), hardest_negatives(sim, pos_mask))


@torch.no_grad()
def soft_negative_weights(sim: torch.Tensor, pos_mask: torch.Tensor, tau: float) -> torch.Tensor:
    """Triplet-SN: (Q, C) weights over each row's negatives, softmax(s_n / tau); zero on positives.

    A row with no negative (a batch of one image) gets all-zero weights, not softmax's 0/0 = NaN."""
    logits = sim.masked_fill(pos_mask, float("-inf")) / tau
    has_negative = (~pos_mask).any(dim=1, keepdim=True)
    weights = torch.softmax(logits.masked_fill(~has_negative, 0.0), dim=1)
    return torch.where(pos_mask | ~has_negative, torch.zeros_like(weights), weights)


@torch.no_grad()
def sliding_windows(relevance: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SW sampling of BCLS: per row, sort the candidates by label (descending, ties by index) and slide a
    window along that order: window `a` pairs the candidate at sorted position `a` with the `window` next
    ones (positions a + 1 .. a + window), so a pair only ever compares candidates of close labels.

    Returns (hi, lo, valid), each (Q, S, W) with S = C - 1 windows (one per start position that has a
    successor) and W = min(window, C - 1): hi / lo are column indices with label(hi) >= label(lo); `valid`
    is False where a + d runs past the end (those entries repeat the last column and must be ignored).
    Pairs are disjoint across windows: (a, a + d) belongs to window a only. C <= 1: S = 0, empty tensors.
    """
    q, c = relevance.shape
    order = torch.argsort(relevance, dim=1, descending=True, stable=True)  # (Q, C)
    w = max(0, min(window, c - 1))
    starts = torch.arange(max(c - 1, 0), device=relevance.device)  # (S,)
    ahead = starts[:, None] + torch.arange(1, w + 1, device=relevance.device)[None, :]  # (S, W)
    valid = ahead < c
    hi = order[:, starts][:, :, None].expand(q, len(starts), w)
    lo = order[:, ahead.clamp_max(max(c - 1, 0)).reshape(-1)].reshape(q, len(starts), w)
    return hi, lo, valid.expand(q, len(starts), w)


@torch.no_grad()
def hardest_in_windows(terms: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """HS mining of BCLS: (Q, S, 1) index, within each window, of the pair with the largest loss term.

    `terms` (Q, S, W) are the per-pair Kendall terms `-tanh(dc / tau_c) tanh(ds / tau_s)` (larger = the
    similarities disagree more with the labels' order); invalid entries never win. Every window has at
    least one valid pair (its first), so exactly one pair per window is kept."""
    return terms.masked_fill(~valid, float("-inf")).argmax(dim=2, keepdim=True)
