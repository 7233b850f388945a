"""`random_walk_gcn`: ViSERN's graph-reasoning op, a first-class op with a torch reference.

For each frame, its K regions are the vertices of a fully connected graph. Given the projected region
features phi(V), psi(V), g(V), each (N, K, C) with N = batch x frames, and a region mask (N, K) (True =
a real region, False = padding), the op computes

    A   = phi psi^T / sqrt(C)                      affinity, (N, K, K)
    A~  = exp(A)  (affinity="softmax")  or  ReLU(A) + eps  (affinity="relu")
    P   = D^-1 A~  over the valid columns            row-stochastic transition matrix of a random walk
    out = P g                                        (N, K, C); rows of padded regions are 0

which is the fused affinity + normalisation + aggregation that TensorRT has no single layer for. The
residual update `V <- W_r(out) + V` and the projections stay ordinary layers (`RandomWalkGCNLayer`).

Two call forms, chosen per layer by `op_form`:
- "standard": the torch reference below; torch.onnx decomposes it into standard ONNX ops (runs anywhere).
- "plugin": `torch.ops.xmr.random_walk_gcn`, a registered custom op whose eager kernel is the same
  reference; the ONNX export (export/custom_ops.py) turns it into one `xmr::RandomWalkGCN` node.
"""

from __future__ import annotations

import math

import torch
from torch import nn

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


@torch.library.custom_op("xmr::random_walk_gcn", mutates_args=())
def random_walk_gcn_plugin(
    phi: torch.Tensor, psi: torch.Tensor, g: torch.Tensor, mask: torch.Tensor, affinity: str, eps: float
) -> torch.Tensor:
    """The same computation behind an opaque custom op (one node in the exported graph)."""
    return random_walk_gcn_reference(phi, psi, g, mask, affinity, eps)


@random_walk_gcn_plugin.register_fake
def _(phi, psi, g, mask, affinity, eps):
    return torch.empty_like(g)


def _backward(ctx, grad):
    phi, psi, g, mask = ctx.saved_tensors
    with torch.enable_grad():
        inputs = [t.detach().requires_grad_(True) for t in (phi, psi, g)]
        out = random_walk_gcn_reference(*inputs, mask, ctx.affinity, ctx.eps)
        grads = torch.autograd.grad(out, inputs, grad)
    return (*grads, None, None, None)


def _setup_context(ctx, inputs, output):
    phi, psi, g, mask, affinity, eps = inputs
    ctx.save_for_backward(phi, psi, g, mask)
    ctx.affinity, ctx.eps = affinity, eps


random_walk_gcn_plugin.register_autograd(_backward, setup_context=_setup_context)

OP_FORMS = {"standard": random_walk_gcn_reference, "plugin": random_walk_gcn_plugin}


def random_walk_gcn(
    phi, psi, g, mask, affinity: str = "softmax", eps: float = 1e-6, form: str = "standard"
) -> torch.Tensor:
    if form not in OP_FORMS:
        raise ValueError(f"op form {form!r}; valid: {', '.join(OP_FORMS)}")
    return OP_FORMS[form](phi, psi, g, mask, affinity, eps)


class RandomWalkGCNLayer(nn.Module):
    """V <- W_r(P g(V)) + V with P from phi(V) psi(V)^T; W_r starts at zero (the layer starts as identity)."""

    def __init__(self, dim: int, affinity: str = "softmax"):
        super().__init__()
        self.phi, self.psi, self.g = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.w_r = nn.Linear(dim, dim)
        nn.init.zeros_(self.w_r.weight)
        nn.init.zeros_(self.w_r.bias)
        self.affinity = affinity
        self.op_form = "standard"  # "plugin" for the custom-op export form (set by use_op_form)

    def forward(self, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = random_walk_gcn(self.phi(v), self.psi(v), self.g(v), mask, self.affinity, form=self.op_form)
        return v + self.w_r(out)
