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

Masking. Padded columns get weight 0: with the softmax affinity their scores are replaced by the most
negative finite value of the scores' dtype (`torch.finfo(dtype).min`, so the fill fits float16 and
bfloat16 as well as float32; a fixed -1e9 overflows float16) before the max-subtracted softmax, with relu
they are multiplied by 0. A row of a frame with no valid region at all has no valid column: by rule its
softmax transition row is uniform, 1/K over all K regions (every score is the same fill value), its relu
row is 0 (0 / eps), and its output row is 0 either way, because the row itself is a padded region. No step
produces NaN or overflows in float16 / bfloat16.

With the softmax affinity the op is masked scaled dot-product attention, `out =
scaled_dot_product_attention(phi, psi, g, attn_mask=valid columns)` on the valid rows (queries phi, keys
psi, values g, the default scale 1 / sqrt(C)); `random_walk_gcn_sdpa` computes it that way (the custom
op's CPU kernel uses it), and the tests check the equivalence.
"""

from __future__ import annotations

import math

import torch

AFFINITIES = ("softmax", "relu")


def masked_fill_value(dtype: torch.dtype) -> float:
    """Finite "minus infinity" for masked scores of `dtype`: exp(it - max) is 0 next to any valid score, and
    a row where every score is masked stays finite (uniform weights, not NaN)."""
    return torch.finfo(dtype).min


def transition_matrix(
    phi: torch.Tensor, psi: torch.Tensor, mask: torch.Tensor, affinity: str = "softmax", eps: float = 1e-6
) -> torch.Tensor:
    """P (N, K, K): row-stochastic over the valid regions of each frame."""
    scores = phi @ psi.transpose(1, 2) / math.sqrt(phi.shape[-1])  # (N, K, K)
    valid_cols = mask.unsqueeze(1)  # (N, 1, K)
    if affinity == "softmax":
        return torch.softmax(scores.masked_fill(~valid_cols, masked_fill_value(scores.dtype)), dim=-1)
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


def random_walk_gcn_sdpa(
    phi: torch.Tensor, psi: torch.Tensor, g: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """The softmax-affinity op as masked scaled dot-product attention (torch's fused SDPA kernels).

    Equal to `random_walk_gcn_reference(..., affinity="softmax")` up to float rounding. A frame with no valid
    region attends to all of its K regions (the reference's uniform rule), so no row is fully masked and
    no SDPA backend returns NaN; those rows are then zeroed with the other padded rows.
    """
    no_valid = ~mask.any(dim=-1)  # (N,)
    attend = (mask | no_valid.unsqueeze(-1)).unsqueeze(1)  # (N, 1, K): the columns each row may read
    out = torch.nn.functional.scaled_dot_product_attention(phi, psi, g, attn_mask=attend)
    return out * mask.unsqueeze(-1).to(out.dtype)
