"""`random_walk_gcn` as a torch custom op (`torch.ops.xmr.random_walk_gcn`), its call forms, and its layer.

The residual update `V <- W_r(out) + V` and the projections stay ordinary layers (`RandomWalkGCNLayer`);
only the fused affinity + normalisation + aggregation (`reference.py`) is the op.

Two call forms, chosen per layer by `op_form`:
- "standard": the torch reference (`reference.py`); torch.onnx decomposes it into standard ONNX ops.
- "plugin": `torch.ops.xmr.random_walk_gcn`, a registered custom op; the ONNX export turns it into one
  `xmr::RandomWalkGCN` node (`onnx_op.py`).

The custom op's kernels: on CUDA, the Triton kernel (`triton.py`, imported on first use so the package
imports where triton is absent; float64, K > 256 regions, or no triton fall back to the reference); on
other devices the reference, with the softmax affinity computed as masked scaled dot-product attention
(`random_walk_gcn_sdpa`, equal up to float rounding). Autograd, on every device, recomputes the reference
(so the gradients are the reference's).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from xmr.models.ops.random_walk_gcn.reference import random_walk_gcn_reference, random_walk_gcn_sdpa


@torch.library.custom_op("xmr::random_walk_gcn", mutates_args=())
def random_walk_gcn_plugin(
    phi: torch.Tensor, psi: torch.Tensor, g: torch.Tensor, mask: torch.Tensor, affinity: str, eps: float
) -> torch.Tensor:
    """The same computation behind an opaque custom op (one node in the exported graph)."""
    if affinity == "softmax" and mask.dtype == torch.bool:
        return random_walk_gcn_sdpa(phi, psi, g, mask)
    return random_walk_gcn_reference(phi, psi, g, mask, affinity, eps)


@functools.cache
def _triton_forward():
    """`random_walk_gcn_triton`, or None where triton is not installed (imported on the first CUDA call)."""
    try:
        from xmr.models.ops.random_walk_gcn.triton import random_walk_gcn_triton
    except ImportError:
        return None
    return random_walk_gcn_triton


def cuda_kernel(phi, psi, g, mask, affinity, eps):
    """The op's CUDA kernel: the Triton kernel for what it implements, the reference otherwise."""
    forward = _triton_forward()
    if forward is not None:
        from xmr.models.ops.random_walk_gcn.triton import DTYPES, MAX_REGIONS

        same_dtype = phi.dtype == psi.dtype == g.dtype
        if same_dtype and g.dtype in DTYPES and g.dim() == 3 and g.shape[1] <= MAX_REGIONS:
            return forward(phi, psi, g, mask, affinity, eps)
    return random_walk_gcn_reference(phi, psi, g, mask, affinity, eps)


random_walk_gcn_plugin.register_kernel("cuda")(cuda_kernel)


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
