"""`random_walk_gcn` in plain torch: the op's definition (the transition matrix and the aggregation).

ViSERN's graph-reasoning op. For each frame, its K regions are the vertices of a fully connected graph.
Given the projected region features phi(V), psi(V), g(V), each (N, K, C) with N = batch x frames, and a
region mask (N, K) (True = a real region, False = padding), the op computes

    A   = phi psi^T / sqrt(C)                      affinity, (N, K, K)
    A~  = exp(A)  (affinity="softmax")  or  ReLU(A) + eps  (affinity="relu")
    P   = D^-1 A~  over the valid columns            row-stochastic transition matrix of a random walk
    out = P g                                        (N, K, C); rows of padded regions are 0

which is the fused affinity + normalisation + aggregation that TensorRT has no single layer for. torch.onnx
decomposes this reference into standard ONNX ops (the "standard" export form).
"""

from __future__ import annotations

import math

import torch

AFFINITIES = ("softmax", "relu")
NEG = -1e9  # finite "minus infinity": a fully padded row gives uniform weights, not NaN


def transition_matrix(
    phi: torch.Tensor, psi: torch.Tensor, mask: torch.Tensor, affinity: str = "softmax", eps: float = 1e-6
) -> torch.Tensor:
    """P (N, K, K): row-stochastic over the valid regions of each frame."""
    scores = phi @ psi.transpose(1, 2) / math.sqrt(phi.shape[-1])  # (N, K, K)
    valid_cols = mask.unsqueeze(1)  # (N, 1, K)
    if affinity == "softmax":
        return torch.softmax(scores.masked_fill(~valid_cols, NEG), dim=-1)
    if affinity == "relu":
        weights = (torch.relu(scores) + eps) * valid_cols.to(scores.dtype)
        return weights / weights.sum(dim=-1, keepdim=True).clamp_min(eps)
    raise ValueError(f"affinity={affinity!r}; expected one of {AFFINITIES}")


def random_walk_gcn_reference(
    phi: torch.Tensor,
    psi: torch.Tensor,
    g: torch.Tensor,
    mask: torch.Tensor,
    affinity: str = "softmax",
    eps: float = 1e-6,
) -> torch.Tensor:
    """The op in plain torch: (N, K, C) x3 + (N, K) bool -> (N, K, C)."""
    out = transition_matrix(phi, psi, mask, affinity, eps) @ g
    return out * mask.unsqueeze(-1).to(out.dtype)
