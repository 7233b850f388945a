"""Negative mining, kept apart from the losses (pytorch-metric-learning's separation).

A miner looks at a similarity matrix under `no_grad` and returns a mask or weights over the negatives of
each anchor; a loss consumes `sim` plus what the miner returned. All functions take `sim` (Q, C), higher =
closer, and a boolean `pos_mask` (Q, C); anchors are rows (transpose `sim` for the other direction).
"""

from __future__ import annotations

import torch


def default_pos_mask(sim: torch.Tensor, pos_mask: torch.Tensor | None) -> torch.Tensor:
    """The diagonal of a paired batch unless a mask is given; checks shape and dtype."""
    if pos_mask is None:
        if sim.shape[0] != sim.shape[1]:
            raise ValueError(f"sim is {tuple(sim.shape)}: a non-square sim needs an explicit pos_mask")
        return torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)
    if pos_mask.shape != sim.shape:
        raise ValueError(f"pos_mask is {tuple(pos_mask.shape)}; expected the shape of sim {tuple(sim.shape)}")
    return pos_mask.bool()


@torch.no_grad()
def hardest_negatives(sim: torch.Tensor, pos_mask: torch.Tensor) -> torch.Tensor:
    """One-hot (Q, C) mask of each row's highest-scoring negative (VSE++'s max violation)."""
    masked = sim.masked_fill(pos_mask, float("-inf"))
    hardest = masked.argmax(dim=1, keepdim=True)
    return torch.zeros_like(pos_mask).scatter_(1, hardest, True) & ~pos_mask


@torch.no_grad()
def all_negatives(sim: torch.Tensor, pos_mask: torch.Tensor) -> torch.Tensor:
    """Every negative of each row (VSE's sum of hinges, Triplet-SH)."""
    return ~pos_mask
