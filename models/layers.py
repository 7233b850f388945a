"""Small building blocks shared by several model families."""

from __future__ import annotations

import torch


def masked_mean(
    x: torch.Tensor, mask: torch.Tensor, dim: int = 1, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean of `x` over `dim`, counting only the steps where `mask` is True, optionally weighted.

    `mask` (and `weights`) cover the leading dims of `x`, `dim` included; missing trailing dims broadcast:
    (B, T, C) with a (B, T) mask -> (B, C). The denominator is the number of valid steps (or the sum of
    their weights), floored at 1e-6: a row with no valid step gives 0.
    """
    w = mask.to(x.dtype) if weights is None else weights * mask.to(x.dtype)
    while w.ndim < x.ndim:
        w = w.unsqueeze(-1)
    return (x * w).sum(dim) / w.sum(dim).clamp_min(1e-6)
