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
    """Triplet-SN: (Q, C) weights over each row's negatives, softmax(s_n / tau); zero on positives."""
    return torch.softmax(sim.masked_fill(pos_mask, float("-inf")) / tau, dim=1)


@torch.no_grad()
def sliding_window_pairs(relevance: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SW sampling of BCLS: per row, rank candidates by label and pair each with the `window` next ones.

    Returns (hi, lo), each (Q, P) column indices with label(hi) >= label(lo); P = sum_{d=1..w} (C - d),
    i.e. O(C * window) pairs per row instead of C (C - 1) / 2.
    """
    order = torch.argsort(relevance, dim=1, descending=True, stable=True)  # (Q, C)
    c = relevance.shape[1]
    his, los = [], []
    for d in range(1, min(window, c - 1) + 1):
        his.append(order[:, : c - d])
        los.append(order[:, d:])
    return torch.cat(his, dim=1), torch.cat(los, dim=1)


@torch.no_grad()
def misordered_pairs(sim: torch.Tensor, hi: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """HS mining of BCLS: (Q, P) mask of pairs whose similarities disagree with their labels' order.

    A row with no misordered pair keeps all its pairs, so its Kendall term still has a value.
    """
    hard = sim.gather(1, hi) < sim.gather(1, lo)
    return hard | ~hard.any(dim=1, keepdim=True)
