"""Retrieval losses over a similarity matrix.

One signature for all: `loss(sim, pos_mask=None)`, `sim` (Q, C) cosine similarities, higher = closer,
`pos_mask` the positives (default: the diagonal of a paired batch). Both directions (rows as anchors, then
columns as anchors) are computed from the same `sim` and summed; `reduction` is "mean" over anchors,
"sum", or "none" (per-anchor, rows then columns). Mining lives in `mining.py`.

Registry `LOSSES` is a literal dict; more objectives arrive with the image-text objectives issue.
"""

from __future__ import annotations

import torch
from torch import nn

from xmr.models.mining import all_negatives, default_pos_mask, hardest_negatives


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


def positive_scores(sim: torch.Tensor, pos_mask: torch.Tensor) -> torch.Tensor:
    """(Q, 1) score of each row's positive (the first one when a row has several)."""
    if not bool(pos_mask.any(dim=1).all()):
        raise ValueError("every anchor needs at least one positive in pos_mask")
    first = pos_mask.float().argmax(dim=1, keepdim=True)
    return sim.gather(1, first)


def hinge_rows(
    sim: torch.Tensor, pos_mask: torch.Tensor, neg_mask: torch.Tensor, margin: float
) -> torch.Tensor:
    """Per row: sum over selected negatives n of [margin - s(p) + s(n)]_+ -> (Q,)."""
    hinge = (margin - positive_scores(sim, pos_mask) + sim).clamp_min(0.0)
    return (hinge * neg_mask).sum(dim=1)


class TripletHN(nn.Module):
    """VSE++ triplet loss with the hardest negative in the batch (max violation), margin m = 0.2.

    `hardest=False` gives the sum over all negatives (Triplet-SH, VSE), the usual warm-up.
    """

    def __init__(self, margin: float = 0.2, hardest: bool = True, reduction: str = "mean"):
        super().__init__()
        self.margin, self.hardest, self.reduction = margin, hardest, reduction

    def forward(self, sim: torch.Tensor, pos_mask: torch.Tensor | None = None) -> torch.Tensor:
        pos = default_pos_mask(sim, pos_mask)
        mine = hardest_negatives if self.hardest else all_negatives
        rows = hinge_rows(sim, pos, mine(sim, pos), self.margin)
        cols = hinge_rows(sim.T, pos.T, mine(sim.T, pos.T), self.margin)
        return both_directions(rows, cols, self.reduction)


LOSSES: dict[str, type[nn.Module]] = {
    "triplet_hn": TripletHN,
}


def make_loss(name: str, **kwargs) -> nn.Module:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid: {', '.join(sorted(LOSSES))}")
    return LOSSES[name](**kwargs)
